"""A small, local calibration set for the embedding backends: int8 calibration and the quality guard.

Written for this project (no data set download): varied topics and lengths, from a few words to ~250 tokens.
"""

from __future__ import annotations

_SENTENCES = (
    "How do I reset my password?",
    "Kafka consumer group rebalancing",
    "The invoice for March was paid twice; please refund the duplicate charge.",
    "Vaccination reduced hospital admissions for influenza among adults over sixty-five.",
    "A binary search tree keeps its keys in sorted order so lookups take logarithmic time.",
    "The quarterly report shows revenue grew 12% while operating costs stayed flat.",
    "Mitochondria produce most of the chemical energy needed to power a cell's biochemical reactions.",
    "Turn left at the second traffic light and the pharmacy is on your right.",
    "Error 503: the upstream service is temporarily unavailable, retry after 30 seconds.",
    "Our team meets every Tuesday at 10 am to review the sprint backlog.",
    "The court ruled that the contract clause was unenforceable under consumer protection law.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Replace the air filter every three months to keep the furnace running efficiently.",
    "She scored the winning goal in the final minute of extra time.",
    "def add(a, b): return a + b",
    "SELECT name, count(*) FROM orders GROUP BY name HAVING count(*) > 10;",
    "The patient presented with fever, cough and shortness of breath for five days.",
    "Interest rates were raised by a quarter point to curb persistent inflation.",
    "Preheat the oven to 200 degrees, then bake the bread for thirty-five minutes.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "The new firmware fixes a bug where the device would not wake from sleep.",
    "Mutations in the BRCA1 gene increase the lifetime risk of breast and ovarian cancer.",
    "Customers can return unused items within 30 days for a full refund.",
    "The telescope detected water vapour in the atmosphere of an exoplanet.",
    "Use a virtual environment so that project dependencies do not conflict.",
    "The museum's new wing displays sculptures from the Renaissance.",
    "Sleep deprivation impairs memory consolidation and attention in adolescents.",
    "Tenant isolation is enforced by a filter on every query.",
    "Wind turbines generated a record share of the country's electricity last winter.",
    "The algorithm's memory use grows linearly with the number of indexed vectors.",
    "Randomized controlled trials are the standard for evaluating new treatments.",
    "Please confirm your shipping address before we dispatch the order.",
    "The bridge was closed for repairs after inspectors found corrosion in its cables.",
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "Chronic kidney disease is associated with increased cardiovascular mortality.",
    "A cold front will bring heavy rain and strong winds on Thursday evening.",
    "The library extends its opening hours during the examination period.",
    "Encrypt data at rest and rotate the keys every ninety days.",
    "Increased expression of the protein was observed in tumour samples compared with normal tissue.",
    "The startup raised a seed round to build tools for small farmers.",
    "Lock the door, switch off the lights and set the alarm before leaving.",
    "Viral load decreased significantly after twelve weeks of antiretroviral therapy.",
    "The novel follows three generations of a family through war and migration.",
    "Backpressure pauses the partitions until the sink catches up.",
    "Children who read daily develop larger vocabularies by the age of eight.",
    "The API returns results in pages of one hundred items with a cursor for the next page.",
)


def calibration_texts() -> list[str]:
    """Single sentences, then paragraphs of 3, 6 and 12 sentences (long texts stress int8 the most)."""
    s = list(_SENTENCES)
    texts = list(s)
    for width in (3, 6, 12):
        for start in range(0, len(s), width * 2):
            texts.append(" ".join(s[(start + j) % len(s)] for j in range(width)))
    return texts
