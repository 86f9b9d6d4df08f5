"""The clinic the realistic benchmarks talk to: a receptionist persona with a page of grounded facts,
the questions a patient asks (with what a right answer must contain), and what it must decline."""

from __future__ import annotations

from dataclasses import dataclass, field

PERSONA = {
    "persona_name": "Maya (Riverside Dental)",
    "system_prompt": "You are Maya, the receptionist at Riverside Dental Clinic, talking with a patient on a video "
                     "call. Answer in one short sentence, using only the clinic facts below. If you do not know, "
                     "say so and offer to have someone call back.",
    "context": (
        "Riverside Dental Clinic, 42 Mill Street, Springfield, second floor, parking behind the building.\n"
        "Hours: Monday to Friday 8 am to 6 pm, Saturday 9 am to 1 pm, closed on Sunday.\n"
        "Phone: 555 0142.\n"
        "Dentists: Dr. Sarah Chen (general dentistry, Monday to Thursday), Dr. Omar Haddad (orthodontics, "
        "Tuesday and Friday), Dr. Lena Novak (children, Wednesday and Saturday).\n"
        "Prices: check-up and cleaning 95 dollars, filling from 140 dollars, whitening 350 dollars, "
        "emergency visit 120 dollars.\n"
        "Insurance: we accept Delta Dental, Cigna and Aetna; other plans pay first and claim back.\n"
        "Appointments can be moved free of charge up to 24 hours before; later changes cost 30 dollars.\n"
        "New patients fill in a form online and arrive 10 minutes early."
    ),
}


# A knowledge-base document for the clinic (benchmarks/turn_latency.py --documents): what a patient
# handbook holds beyond the persona's page of facts.
HANDBOOK = """# Riverside Dental patient handbook

## Before your visit
Bring your insurance card and a list of the medicines you take. Eat normally before a check-up.
Children under 16 come with a parent or guardian.

## After a filling
Do not eat for 2 hours while the numbness wears off. Mild sensitivity for a few days is normal.
Call us if the pain lasts more than a week.

## After a tooth extraction
Bite on the gauze for 30 minutes. No hot drinks, smoking or sport for 24 hours.
Rinse gently with salt water from the second day.

## Whitening
Whitening takes one visit of about 90 minutes. Avoid coffee, tea and red wine for 48 hours after it.
The result lasts one to three years.

## Emergencies
For a knocked-out tooth, keep it in milk and come in within one hour.
Outside opening hours, call the emergency line 555 0199.

## Payment
We take cards and cash. Treatment over 500 dollars can be paid in monthly instalments.
A missed appointment without notice costs 30 dollars.

## Accessibility
There is a lift to the second floor and a wheelchair accessible toilet. Guide dogs are welcome.
"""


@dataclass(frozen=True)
class Question:
    text: str
    kind: str  # "fact" (must contain `expect`), "decline" (not in the facts), "small_talk"
    expect: list[list[str]] = field(default_factory=list)  # every group must match one of its words


def fact(text: str, *groups: str) -> Question:
    return Question(text, "fact", [g.split("|") for g in groups])


QUESTIONS = [
    fact("What time do you open on Saturday?", "9|nine"),
    fact("What are your opening hours on weekdays?", "8|eight", "6|six"),
    fact("Are you open on Sunday?", "closed|no|not"),
    fact("When do you close on Saturday?", "1|one"),
    fact("When do you close on a weekday?", "6|six"),
    fact("Where is the clinic?", "42|Mill"),
    fact("What's the street address?", "Mill"),
    fact("Which floor is the clinic on?", "second|2nd|two"),
    fact("Where can I park my car?", "behind"),
    fact("What is your phone number?", "555"),
    fact("Which dentist treats children?", "Novak|Lena"),
    fact("Who does braces at your clinic?", "Haddad|Omar"),
    fact("Who is your general dentist?", "Chen|Sarah"),
    fact("Which days does Dr. Chen work?", "Monday", "Thursday"),
    fact("Is Dr. Haddad in on Fridays?", "yes|Friday"),
    fact("When does Dr. Novak see patients?", "Wednesday", "Saturday"),
    fact("How much is a check-up and cleaning?", "95|ninety-five|ninety five"),
    fact("How much does a filling cost?", "140|hundred and forty|hundred forty"),
    fact("What does teeth whitening cost?", "350|three hundred and fifty|three hundred fifty"),
    fact("How much is an emergency visit?", "120|hundred and twenty|hundred twenty"),
    fact("Do you take Cigna insurance?", "yes|accept|take|do"),
    fact("Which insurance plans do you accept?", "Delta", "Cigna", "Aetna"),
    fact("My insurance is not on your list. What happens then?", "claim|pay"),
    fact("Can I move my appointment without paying?", "24|twenty-four|twenty four"),
    fact("What does it cost to change my appointment on the same day?", "30|thirty"),
    fact("What should a new patient do before the first visit?", "form|online|early|10|ten"),
    fact("How early should I arrive for my first visit?", "10|ten"),
    fact("Do you accept Aetna?", "yes|accept|Aetna"),
    fact("What's your name?", "Maya"),
    fact("What is the name of the clinic?", "Riverside"),
    Question("Do you do laser eye surgery?", "decline"),
    Question("How much does a dental implant cost?", "decline"),
    Question("Is Dr. Smith available tomorrow?", "decline"),
    Question("What is the wifi password in the waiting room?", "decline"),
    Question("Do you have another clinic in Boston?", "decline"),
    Question("Can you prescribe antibiotics over the phone?", "decline"),
    Question("How much is a root canal?", "decline"),
    Question("Are you open on Christmas Day?", "decline"),
    Question("Hi there, how are you today?", "small_talk"),
    Question("Thanks, that's really helpful.", "small_talk"),
    Question("I'm a bit nervous about going to the dentist.", "small_talk"),
    Question("Have a nice day!", "small_talk"),
    Question("Can you hear me okay?", "small_talk"),
]
