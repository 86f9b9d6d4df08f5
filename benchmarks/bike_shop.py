"""A second persona for the grounded LLM evaluation, held out from tuning: a bike shop's front desk.

Prompt rules and reply checks are tuned on the clinic (benchmarks/clinic.py); this persona's facts,
wording and questions were written apart from it, so its score says whether a change generalises or
only fits the clinic's questions."""

from __future__ import annotations

from benchmarks.clinic import Question, fact

PERSONA = {
    "persona_name": "Tom (Northside Cycles)",
    "system_prompt": "You are Tom, who runs the front desk of Northside Cycles, a bike shop, talking with a customer "
                     "on a video call. Keep answers to one short sentence and stick to the shop information below. "
                     "If you are not sure, say so and offer to have a mechanic call back.",
    "context": (
        "Northside Cycles, 7 Canal Road, Millbrook, next to the train station.\n"
        "Open Tuesday to Saturday 10 am to 7 pm; closed Sunday and Monday.\n"
        "Phone: 555 0187.\n"
        "Staff: Priya Raman (owner, wheel building), Jonas Berg (mechanic, e-bikes), Ada Flynn (bike fitting, "
        "Thursdays only).\n"
        "Service prices: basic tune-up 60 dollars, full service 140 dollars, flat tyre repair 15 dollars, "
        "bike fitting 90 dollars.\n"
        "Repairs take 2 to 3 days; flat tyres are fixed while you wait.\n"
        "We sell city bikes, road bikes and e-bikes, from Trek and Brompton.\n"
        "Test rides need a photo ID; rentals are 25 dollars a day."
    ),
}

QUESTIONS = [
    fact("What days are you open?", "Tuesday", "Saturday"),
    fact("What time do you close?", "7|seven"),
    fact("Are you open on Monday?", "closed|no|not"),
    fact("Where is the shop?", "Canal|7"),
    fact("Is the shop near the station?", "yes|next|station"),
    fact("What's your phone number?", "555"),
    fact("Who builds wheels?", "Priya|Raman"),
    fact("Who works on e-bikes?", "Jonas|Berg"),
    fact("When can I get a bike fitting?", "Thursday"),
    fact("How much is a tune-up?", "60|sixty"),
    fact("What does a full service cost?", "140|hundred and forty|hundred forty"),
    fact("How much do you charge to fix a flat?", "15|fifteen"),
    fact("How long does a repair take?", "2|3|two|three"),
    fact("Can I wait while you fix my flat tyre?", "yes|wait"),
    fact("Which brands do you sell?", "Trek", "Brompton"),
    fact("Do you sell e-bikes?", "yes|e-bikes|sell"),
    fact("What do I need for a test ride?", "ID|photo"),
    fact("How much is it to rent a bike?", "25|twenty-five|twenty five"),
    fact("Who owns the shop?", "Priya|Raman"),
    Question("Do you repair motorcycles?", "decline"),
    Question("How much is a new chain?", "decline"),
    Question("Do you sell Specialized bikes?", "decline"),
    Question("Can I pay in bitcoin?", "decline"),
    Question("Are you open on New Year's Day?", "decline"),
    Question("Do you have a shop in Chicago?", "decline"),
    Question("Hello, can you see me?", "small_talk"),
    Question("Thanks a lot, bye!", "small_talk"),
    Question("I just started cycling and I'm a bit wobbly.", "small_talk"),
]
