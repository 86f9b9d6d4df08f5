"""A third persona for the grounded LLM evaluation, held out from all tuning: a small hotel's front desk.

Written before models.grounding's reply check was built, and never used to tune it (the clinic tuned
it, the bike shop was looked at while it was written): its score is the one that says how the check
does on questions nobody fitted it to."""

from __future__ import annotations

from benchmarks.clinic import Question, fact

PERSONA = {
    "persona_name": "Lucia (Harbour Lights Hotel)",
    "system_prompt": "You are Lucia at the front desk of the Harbour Lights Hotel, speaking with a guest on a video "
                     "call. Reply in one short sentence based only on the hotel information below. If it does not "
                     "say, tell the guest you will check with the manager.",
    "context": (
        "Harbour Lights Hotel, 15 Quay Street, Port Ellen, on the seafront.\n"
        "Check-in from 3 pm, check-out by 11 am; late check-out until 1 pm costs 20 pounds.\n"
        "Rooms: single 80 pounds, double 110 pounds, sea-view suite 180 pounds a night, breakfast included.\n"
        "Breakfast is served 7 to 10 am in the Anchor Room.\n"
        "Free parking for 12 cars behind the hotel; dogs welcome for 10 pounds a night.\n"
        "The bar closes at midnight; the restaurant is closed on Mondays.\n"
        "Airport shuttle on request, 15 pounds each way.\n"
        "Manager: Fiona Grant. Reception: 555 0163."
    ),
}

QUESTIONS = [
    fact("What time is check-in?", "3|three"),
    fact("When do I have to check out?", "11|eleven"),
    fact("Can I check out late?", "1|one|20|twenty"),
    fact("How much is a double room?", "110|hundred and ten|hundred ten"),
    fact("What does the sea-view suite cost?", "180|hundred and eighty|hundred eighty"),
    fact("Is breakfast included?", "yes|included"),
    fact("When is breakfast served?", "7|seven", "10|ten"),
    fact("Where do you serve breakfast?", "Anchor"),
    fact("Is there parking?", "yes|free|parking"),
    fact("Can I bring my dog?", "yes|welcome|10|ten"),
    fact("When does the bar close?", "midnight|12"),
    fact("Is the restaurant open on Monday?", "closed|no|not"),
    fact("Do you have an airport shuttle?", "yes|shuttle|request|15|fifteen"),
    fact("Who is the manager?", "Fiona|Grant"),
    fact("What's the address of the hotel?", "Quay|15"),
    fact("What's the reception phone number?", "555"),
    fact("How much is a single room?", "80|eighty"),
    Question("Do you have a swimming pool?", "decline"),
    Question("Is there a gym in the hotel?", "decline"),
    Question("How much does a taxi to the station cost?", "decline"),
    Question("Can I pay with American Express?", "decline"),
    Question("Do you have rooms with a balcony?", "decline"),
    Question("Is there a spa?", "decline"),
    Question("Good evening, how are you?", "small_talk"),
    Question("That sounds lovely, thank you.", "small_talk"),
    Question("We're celebrating our anniversary this weekend.", "small_talk"),
]
