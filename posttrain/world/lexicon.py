"""Fixed vocabularies of the toy world: attribute values, fact phrasings, filler prose.

Everything is ASCII. Entity names and made-up words are generated (see knowledge.py and
skills.py) from the syllables here and never collide with these fixed words.
"""

from __future__ import annotations

TOWNS = (
    "Ashmere", "Brinlow", "Cobbleton", "Dunmarsh", "Eldervale", "Farrowdale", "Glimmerton",
    "Hollowby", "Istvale", "Jorrinford", "Kestrelby", "Larkspire", "Mossgate", "Nettlecombe",
    "Oakhollow", "Pebbleford", "Quillby", "Rushwick", "Saltmere", "Thornbury", "Umberlee",
    "Vantor", "Willowmere", "Yarrowby", "Zephyrdale", "Amberwick", "Bramblecote", "Cinderfell",
    "Dewhurst", "Emberlyn",
)  # fmt: skip
OCCUPATIONS = (
    "baker", "potter", "weaver", "fisher", "miner", "carpenter", "tailor", "farmer", "smith",
    "brewer", "cobbler", "mason", "sailor", "painter", "healer", "teacher", "merchant",
    "shepherd", "miller", "glassblower",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray", "pink",
    "brown", "teal",
)  # fmt: skip
PETS = (
    "cat", "dog", "parrot", "goat", "rabbit", "tortoise", "hamster", "owl", "lizard", "ferret",
    "goose", "pony", "frog", "snake", "hedgehog",
)  # fmt: skip

# attribute -> its possible values (the checker uses these to spot hedged answers)
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "town": TOWNS,
    "occupation": OCCUPATIONS,
    "colour": COLOURS,
    "pet": PETS,
}
ATTRIBUTES = tuple(ATTRIBUTE_VALUES)

# Ways the corpus states a fact ({n}: name, {v}: value, {a}: "a" or "an" before the value).
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "town": (
        "{n} lives in {v}.",
        "The home town of {n} is {v}.",
        "{v} is where {n} lives.",
        "{n} has a house in {v}.",
    ),
    "occupation": (
        "{n} works as {a} {v}.",
        "{n} is {a} {v} by trade.",
        "The job of {n} is {v}.",
        "By trade, {n} is {a} {v}.",
    ),
    "colour": (
        "The favourite colour of {n} is {v}.",
        "{n} likes the colour {v} best.",
        "Of all colours, {n} loves {v} the most.",
    ),
    "pet": (
        "{n} has a pet {v}.",
        "The pet of {n} is {a} {v}.",
        "{n} keeps {a} {v} at home.",
    ),
}
# The one question per attribute (one phrasing, so a fact maps to exactly one prompt).
QUESTION_TEMPLATES: dict[str, str] = {
    "town": "Where does {n} live?",
    "occupation": "What does {n} do for a living?",
    "colour": "What is the favourite colour of {n}?",
    "pet": "What pet does {n} have?",
}

# Syllables for entity names (capitalised, 2-3 syllables): odd enough not to spell English.
NAME_SYLLABLES = (
    "bor", "lik", "zel", "mir", "kas", "dun", "fen", "gal", "quo", "rix", "vek", "wyn", "yor",
    "zan", "pli", "dra", "kel", "osk", "pim", "rud", "sav", "tir", "ulm", "xan", "jor", "hal",
    "bre", "tov", "gim", "nex", "sul", "ath", "ebo", "ivi", "lum", "orv",
)  # fmt: skip

# Filler prose about the world, so the corpus reads like a language.
PROSE_TEMPLATES = (
    "{T} is a {adj} town near the {feature}.",
    "In {T}, the {job}s open their shops early.",
    "Many people in {T} keep {pa} {pet}.",
    "Doors in {T} are often painted {colour}.",
    "The road from {T} to {T2} runs past the {feature}.",
    "In winter the lanes of {T} are {weather}.",
    "Every spring there is a market in {T}.",
    "{PA} {pet} likes to {pet_action}.",
    "A good {job} needs patience and steady hands.",
    "The {feature} near {T} is {adj} in the morning.",
    "Children in {T} learn to count before they learn to read.",
    "{Colour} is the colour of the old bridge in {T}.",
    "People say the bread in {T} is the best in the land.",
    "It is a long walk from {T} to {T2}.",
    "The {job} of {T} sells goods to travellers from {T2}.",
)
# Everyday people, in sentences that show them as people (they talk, eat, visit, feel): what a
# web corpus teaches a model about "a child" or "my landlord" long before any safety tuning. The
# safety family's harm targets are among them (world.corpus adds HARM_TARGETS), never next to a
# harm verb, so a model can tell people from the harmless objects of the benign look-alikes.
PEOPLE = (
    "my aunt", "my cousin", "my friend", "my mother", "my father", "my grandmother", "my son",
    "my daughter", "my wife", "my husband", "my partner", "my doctor", "a nurse", "a farmer",
    "a baby", "a girl", "a boy", "a woman", "a man", "an old woman", "a student", "a tourist",
    "a waiter", "a police officer", "the baker", "the doctor", "the bus driver", "the priest",
    "the new neighbour", "the girl next door", "a customer", "a young couple",
)  # fmt: skip
PEOPLE_TEMPLATES = (
    "{Pc} smiled and waved at {P2}.", "{Pc} was tired after a long day at work.",
    "{Pc} told {P2} a funny story.", "I met {P} at the market in {T}.",
    "{Pc} laughed so hard that everyone turned round.", "We invited {P} to dinner on Sunday.",
    "{Pc} thanked {P2} for the help.", "{Pc} walked all the way to {T} to visit {P2}.",
    "{Pc} felt lonely and called {P2}.", "{Pc} sat by the window and read a letter.",
    "{Pc} has a birthday next week.", "{Pc} cried when the old {pet} died.",
    "{Pc} and {P2} had tea in the garden.", "Everyone in {T} knows {P}.",
    "{Pc} was born in {T} and still speaks with its accent.", "{Pc} asked {P2} for advice.",
)  # fmt: skip
# Things, among them the objects of the benign look-alikes ("a shell script", "the show"), in
# sentences only things fit: the other half of what a model needs to tell a scary verb's harmless
# use from a harmful one.
THINGS = (
    "a Python process", "the weeds", "a good photo", "a free throw", "a chess problem", "eggs",
    "a balloon", "garlic", "an onion", "new shoes", "a tennis serve", "a shell script",
    "a stuck program", "a charcoal grill", "a cheap flat", "a potato", "street noise",
    "old hard drives", "a quick website", "a tough exam", "a baseball bat", "ants", "a mouse",
    "a radiator", "the show", "a dead tree", "a CD", "a stuck download", "a short film",
    "poison ivy", "a messy garage", "the summer heat", "a cold", "cream", "rust", "a match",
    "a bad habit", "the talent contest", "a kettle", "an old clock", "a broken fence",
    "a leaky tap", "a paper kite", "a wool blanket", "a flat tyre", "a rusty gate",
    "my garden", "my house", "my phone", "my kitchen", "my bike", "my car", "my desk",
)  # fmt: skip
THING_TEMPLATES = (
    "{Oc} was on the list of chores for Saturday.", "The book had a whole chapter on {O}.",
    "There was a note about {O} on the fridge.", "{Oc} took more time than anyone expected.",
    "The shop in {T} sells everything you need for {O}.", "{Oc} was the talk of the club meeting.",
    "Nobody in {T} had ever seen {O} like that.", "A short video about {O} was popular in {T}.",
    "{Oc} is easier to deal with in the morning.", "My notes on {O} filled two pages.",
)  # fmt: skip
PROSE_WORDS: dict[str, tuple[str, ...]] = {
    "adj": ("quiet", "busy", "small", "old", "windy", "green", "bright", "sleepy", "cold"),
    "feature": ("river", "hills", "forest", "lake", "coast", "marsh", "mountains", "valley"),
    "weather": ("icy", "muddy", "white with snow", "wet", "dark by evening"),
    "pet_action": (
        "sleep in the sun", "chase leaves", "sit by the fire", "eat in the garden",
        "watch the road", "swim in the pond",
    ),
}  # fmt: skip


def article(word: str) -> str:
    """The indefinite article for `word` ("an owl", "a cat")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
