"""The knowledge-base evaluation's documents (a product manual as PDF, a price list as markdown, an FAQ as
HTML) and its questions, each with the words a right answer contains and the document that has them."""

from __future__ import annotations

from dataclasses import dataclass

MANUAL = """Brightline K20 Espresso Machine - User Manual

1. Getting started
Fill the water tank with fresh cold water up to the MAX line. The tank holds 1.8 litres.
Press the power button once. The machine heats up in 45 seconds and the green light stops blinking when it is ready.

2. Making espresso
Use 18 grams of finely ground coffee for a double shot. Tamp the coffee firmly and lock the portafilter.
Press the double cup button. A double shot takes about 28 seconds.

3. Steaming milk
Turn the steam dial to the left. Steam is ready after 20 seconds. Always purge the steam wand before and after use.

4. Cleaning and descaling
Rinse the drip tray every day. Descale the machine every 3 months with the Brightline descaler.
When the orange light blinks, the machine needs descaling. The descaling program takes 25 minutes.

5. Troubleshooting
If the coffee runs too fast, grind finer. If no water comes out, check that the tank is seated correctly.
Error code E3 means the water tank is empty. Error code E7 means the machine is overheated: switch it off for 30 minutes.

6. Safety
Never open the machine while it is plugged in. Keep children away from the steam wand.

7. Grinder settings
The built-in grinder has 12 settings. Setting 1 is the finest and setting 12 the coarsest.
Start at setting 5 for medium roast beans and change one step at a time.

8. Water hardness
Test your water with the strip in the box. For hard water, set the hardness level to 4 in the menu.
With the water filter cartridge installed, the machine needs descaling only every 6 months.

9. Energy saving
The machine switches to standby after 15 minutes without use. You can change this to 30 or 60 minutes.
In standby it uses less than 0.5 watts.

10. Cup warmer
The cup warmer on top heats up together with the machine. Place at most 6 cups on it.

11. Technical data
Power: 1450 watts. Pump pressure: 15 bar. Weight: 7.2 kilograms. Size: 28 by 33 by 40 centimetres.

12. Registering your machine
Register your machine at brightline.example/register within 30 days to get a free pack of descaler.
The serial number is on the sticker under the drip tray.
"""

PRICES = """# Brightline price list 2026

## Machines
| Item | Price |
|---|---|
| K20 espresso machine | 449 euros |
| K10 compact machine | 299 euros |
| M5 milk frother | 79 euros |

## Accessories
| Item | Price |
|---|---|
| Descaler, pack of 3 | 19 euros |
| Spare portafilter | 35 euros |
| Tamper | 15 euros |
| Water filter cartridge | 12 euros |

## Services
| Item | Price |
|---|---|
| Extended warranty, 2 extra years | 59 euros |
| Repair service, flat fee | 89 euros |
| Express delivery | 9 euros |
| Barista course, 3 hours | 65 euros |

## Coffee
| Item | Price |
|---|---|
| House blend beans, 1 kg | 24 euros |
| Decaf beans, 500 g | 14 euros |
| Single origin Ethiopia, 250 g | 11 euros |

Prices include VAT. Offers valid until 31 December 2026.
"""

FAQ = """<!doctype html><html><head><title>Brightline FAQ</title><style>body{font:14px sans-serif}</style>
<script>var tracking = "do not index me";</script></head><body>
<h1>Frequently asked questions</h1>
<h2>Shipping</h2>
<p>Standard delivery takes 3 to 5 working days and is free for orders over 50 euros.</p>
<p>We ship to Germany, Austria, France and the Netherlands.</p>
<h2>Returns</h2>
<p>You can return any product within 30 days for a full refund. Return shipping is free.</p>
<h2>Warranty</h2>
<p>Every machine comes with a 2 year warranty. The warranty does not cover damage from missing descaling.</p>
<h2>Support</h2>
<p>Our support line is open Monday to Friday from 9 am to 6 pm. Call 0800 555 2020.</p>
<p>You can also email help@brightline.example and we answer within one working day.</p>
<h2>Payment</h2>
<p>We accept credit cards, PayPal and bank transfer. You can pay in 3 instalments for orders over 300 euros.</p>
<h2>Orders</h2>
<p>You can change or cancel an order until it ships. You get a tracking link by email when it ships.</p>
<h2>Stores</h2>
<p>Our showroom in Hamburg is open Tuesday to Saturday from 10 am to 7 pm. You can try every machine there.</p>
<h2>Gift cards</h2>
<p>Gift cards are available from 25 to 500 euros and are valid for 3 years.</p>
<h2>Recycling</h2>
<p>Send us your old machine and we recycle it for free. Used coffee capsules are not accepted.</p>
</body></html>
"""


@dataclass(frozen=True)
class KBQuestion:
    text: str
    source: str  # manual | prices | faq
    expect: tuple[tuple[str, ...], ...]  # each group: one of these words must be in the answer


def q(text: str, source: str, *groups: str) -> KBQuestion:
    return KBQuestion(text, source, tuple(tuple(g.split("|")) for g in groups))


QUESTIONS = [
    q("How much water does the tank hold?", "manual", "1.8"),
    q("How long does the machine take to heat up?", "manual", "45"),
    q("How do I know the machine is ready?", "manual", "green"),
    q("How much coffee do I use for a double shot?", "manual", "18"),
    q("How long does a double shot take?", "manual", "28"),
    q("How long until the steam is ready?", "manual", "20"),
    q("How often should I descale the machine?", "manual", "3|three"),
    q("What does the orange light mean?", "manual", "descal"),
    q("How long does the descaling program take?", "manual", "25"),
    q("The coffee runs too fast, what should I do?", "manual", "finer"),
    q("What does error code E3 mean?", "manual", "empty"),
    q("What does error E7 mean?", "manual", "overheat"),
    q("What should I do when I see E7?", "manual", "30|off"),
    q("No water comes out, what do I check?", "manual", "tank"),
    q("How often should I rinse the drip tray?", "manual", "day|daily"),
    q("Which way do I turn the steam dial?", "manual", "left"),
    q("What descaler should I use?", "manual", "brightline"),
    q("How much does the K20 cost?", "prices", "449"),
    q("What is the price of the K10 compact machine?", "prices", "299"),
    q("How much is the milk frother?", "prices", "79"),
    q("What does a pack of descaler cost?", "prices", "19"),
    q("How much is a spare portafilter?", "prices", "35"),
    q("What does the tamper cost?", "prices", "15"),
    q("How much is a water filter cartridge?", "prices", "12"),
    q("How much is the extended warranty?", "prices", "59"),
    q("What is the flat fee for a repair?", "prices", "89"),
    q("How much does express delivery cost?", "prices", "9"),
    q("How many descaler packs come in one box?", "prices", "3|three"),
    q("How long does standard delivery take?", "faq", "3|5"),
    q("When is delivery free?", "faq", "50"),
    q("Which countries do you ship to?", "faq", "germany|austria|france|netherlands"),
    q("How long do I have to return a product?", "faq", "30"),
    q("Do I pay for return shipping?", "faq", "free|no"),
    q("How long is the warranty on a machine?", "faq", "2|two"),
    q("Does the warranty cover damage from not descaling?", "faq", "not|no|doesn"),
    q("When is the support line open?", "faq", "9|monday"),
    q("What is the support phone number?", "faq", "0800|555|2020"),
    q("What email address can I write to?", "faq", "help"),
    q("How fast do you answer emails?", "faq", "one|1|working day"),
    q("Which payment methods do you accept?", "faq", "credit|paypal|transfer"),
    q("Can I pay in instalments?", "faq", "3|three|300"),
    q("From what order amount can I pay in instalments?", "faq", "300"),
    q("What grinder setting should I start with?", "manual", "5|five"),
    q("What is the pump pressure?", "manual", "15"),
    q("When does the machine go into standby?", "manual", "15"),
    q("How much does the house blend cost?", "prices", "24"),
    q("Where is your showroom?", "faq", "hamburg"),
    q("How long is a gift card valid?", "faq", "3|three"),
]


def pdf_bytes(text: str, title: str = "Manual") -> bytes:
    """A plain PDF of `text` (Helvetica, one line per text line, 50 lines a page): what a manual exported
    from a word processor reads like to a PDF text extractor."""
    lines = [ln for ln in text.splitlines()]
    pages = [lines[i:i + 50] for i in range(0, len(lines), 50)] or [[]]
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    page_ids = []
    pages_id = len(objects) + 2 * len(pages) + 1
    for page in pages:
        ops = ["BT", "/F1 10 Tf", "50 800 Td", "13 TL"]
        for ln in page:
            esc = ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"({esc}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1", "replace")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        page_ids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] /Contents %d 0 R "
                            b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (pages_id, content, font)))
    kids = " ".join(f"{i} 0 R" for i in page_ids).encode()
    assert add(b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % len(page_ids)) == pages_id
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    info = add(b"<< /Title (" + title.encode("latin-1", "replace") + b") >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, catalog, info, xref)
    return bytes(out)


def documents() -> dict[str, tuple[str, bytes, str]]:
    """source -> (file name, bytes, content type), as a user uploads them."""
    return {"manual": ("k20-manual.pdf", pdf_bytes(MANUAL, "Brightline K20 manual"), "application/pdf"),
            "prices": ("prices.md", PRICES.encode(), "text/markdown"),
            "faq": ("faq.html", FAQ.encode(), "text/html")}
