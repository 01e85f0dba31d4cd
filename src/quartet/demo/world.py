"""A tiny restaurant town: the world that ``quartet demo`` runs RLHF on.

The idea, in one sentence: *let a machine find good restaurants -- reward tasty
meals.*  The town has a handful of restaurants.  Each has a public face (name,
cuisine, price, area, a few dishes) and a HIDDEN quality in [0, 1] that nobody
writes down.  Diners send short requests ("cheap noodles near the station
tonight?") and the model answers in one fixed, short format::

    Try Lotus Garden near the station: cheap noodles, get the beef broth.

The pipeline, and what each stage can learn from this world:

1. **SFT** imitates answers that have the right *format* and usually the right
   cuisine, but were picked with no regard to quality (``sft_examples``).  So
   the SFT model knows how to answer, but not where the food is good.
2. **Reward model** learns the diners' taste from noisy pairwise preferences.
   A simulated person (``prefers_first``) picks the better of two answers with
   probability ``sigmoid(gold_a - gold_b)``, so labels are sometimes wrong.
3. **PPO** pushes the policy towards answers the reward model likes.
4. The **GOLD judge** (``gold_score``) is the diner's true satisfaction.  It is
   never shown to the model; it only measures what really happened (did RL
   learn the taste, or did it learn to fool the reward model?).

Everything is pure Python and deterministic given the seeds.  Convention:
each stage draws its prompts with its own seed (``SEED_SFT``, ``SEED_RM``,
``SEED_PPO``) and evaluation uses ``SEED_EVAL``, which no training stage uses.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

CUISINES = ("noodles", "pizza", "curry", "sushi", "tacos", "burgers")
PLACE = {"noodles": "noodle", "pizza": "pizza", "curry": "curry",
         "sushi": "sushi", "tacos": "taco", "burgers": "burger"}
DISHES = {
    "noodles": ("beef broth", "spicy ramen", "pork dumplings", "sesame noodles", "chicken pho"),
    "pizza": ("margherita", "pepperoni slice", "garlic knots", "mushroom pizza", "four cheese"),
    "curry": ("lamb curry", "butter chicken", "chickpea curry", "garlic naan", "lentil dal"),
    "sushi": ("salmon roll", "tuna nigiri", "eel bowl", "miso soup", "spicy tuna roll"),
    "tacos": ("fish tacos", "carnitas", "al pastor", "churros", "chicken burrito"),
    "burgers": ("double cheeseburger", "veggie burger", "onion rings", "bacon burger",
                "sweet potato fries"),
}
PRICES = ("cheap", "moderate", "pricey")
PRICE_WORD = {"cheap": "cheap", "moderate": "mid-priced", "pricey": "pricey"}
AREAS = ("near the station", "by the river", "downtown", "in the old town")
NAMES = (
    "Lotus Garden", "Blue Door Diner", "Golden Bowl", "Red Lantern", "Little Fig",
    "Olive Tree", "Copper Pot", "Green Lamp", "Moon Gate", "Silver Spoon", "Maple Table",
    "Paper Crane", "Saffron House", "Corner Grill", "Jade Palace", "Sunny Side",
    "Iron Skillet", "Salt and Smoke", "Night Owl", "Twin Oaks", "Rosewood", "Happy Dragon",
    "Stone Oven", "Pepper Tree", "Wild Thyme", "Cedar Hall", "Bamboo Hut", "Lucky Cat",
    "Blue Heron", "Fat Sparrow", "Honey Pot", "Velvet Fork",
)
REASONS = ("get the {dish}", "order the {dish}", "the {dish} is great", "famous for its {dish}")

# Request wording.  Phrase sets are disjoint so that ``parse_request`` can undo them.
BUDGET_ADJ = {"cheap": "cheap", "moderate": "mid-priced", "pricey": "fancy"}
BUDGET_TAIL = {
    "cheap": ("on a budget", "that won't cost much", "nothing expensive"),
    "moderate": ("not too expensive", "at a fair price", "reasonably priced"),
    "pricey": ("for a special night out", "money is no object", "somewhere fancy"),
}
AREA_WORDS = {
    "near the station": ("near the station", "close to the station", "by the train station"),
    "by the river": ("by the river", "on the riverside", "near the river"),
    "downtown": ("downtown", "in the city centre", "in the middle of town"),
    "in the old town": ("in the old town", "in the old quarter", "around the old town"),
}
FRAMES = ("Any {core}{tail}?", "I want {core}{tail}.", "Where can I get {core}{tail}?",
          "Looking for {core}{tail}.", "{Core}{tail} tonight?", "Can you recommend {core}{tail}?",
          "Craving {core}{tail}. Ideas?", "Where should I go for {core}{tail}?")
OPEN_REQUESTS = ("Where should I eat tonight?", "Any recommendations for dinner?",
                 "I'm hungry. Where should I go?", "Surprise me: where should I eat?",
                 "What's good around here?")

# Gold judge constants (see ``gold_score``).
GOLD_UNPARSEABLE = -4.0
PENALTY_CAP = 1.0
MAX_WORDS = 20
SEED_SFT, SEED_RM, SEED_PPO, SEED_EVAL = 1001, 2002, 3003, 4004


@dataclass(frozen=True)
class Restaurant:
    name: str
    cuisine: str
    price: str  # one of PRICES
    area: str  # one of AREAS
    dishes: tuple[str, ...]
    quality: float  # HIDDEN: never appears in any text the model sees


@dataclass(frozen=True)
class Request:
    cuisine: str | None
    budget: str | None
    area: str | None
    text: str


@dataclass(frozen=True)
class Town:
    seed: int
    restaurants: tuple[Restaurant, ...]

    @classmethod
    def generate(cls, seed: int, n_restaurants: int = 16) -> "Town":
        """Build a town.  Every cuisine gets >= 2 restaurants: one good (q >= 0.75), one bad (q <= 0.25)."""
        if not 2 * len(CUISINES) <= n_restaurants <= len(NAMES):
            raise ValueError(f"n_restaurants must be in [{2 * len(CUISINES)}, {len(NAMES)}]")
        rng = random.Random(seed)
        names = rng.sample(NAMES, n_restaurants)
        cuisines = list(CUISINES) * 2 + [rng.choice(CUISINES) for _ in range(n_restaurants - 12)]
        seen: dict[str, int] = {}
        out = []
        for name, cuisine in zip(names, cuisines):
            k = seen[cuisine] = seen.get(cuisine, 0) + 1
            lo, hi = (0.75, 0.95) if k == 1 else (0.05, 0.25) if k == 2 else (0.05, 0.95)
            out.append(Restaurant(
                name=name, cuisine=cuisine, price=rng.choice(PRICES), area=rng.choice(AREAS),
                dishes=tuple(rng.sample(DISHES[cuisine], rng.choice((2, 3)))),
                quality=round(rng.uniform(lo, hi), 3)))
        rng.shuffle(out)
        return cls(seed=seed, restaurants=tuple(out))

    def by_name(self, name: str) -> Restaurant | None:
        return next((r for r in self.restaurants if r.name == name), None)

    def mean_quality(self) -> float:
        return sum(r.quality for r in self.restaurants) / len(self.restaurants)

    def sample_request(self, rng: random.Random) -> Request:
        """Draw a diner's request (cuisine 85%, budget 45%, area 45% of the time) and word it."""
        cuisine = rng.choice(CUISINES) if rng.random() < 0.85 else None
        budget = rng.choice(PRICES) if rng.random() < 0.45 else None
        area = rng.choice(AREAS) if rng.random() < 0.45 else None
        return Request(cuisine, budget, area, _render_request(cuisine, budget, area, rng))

    def describe(self) -> list[str]:
        """Public facts, one sentence per restaurant (no quality) -- handy tokenizer text."""
        return [f"{r.name} is a {PRICE_WORD[r.price]} {PLACE[r.cuisine]} place {r.area}. "
                f"Try the {' or the '.join(r.dishes)}." for r in self.restaurants]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "restaurants": [asdict(r) for r in self.restaurants]}

    @classmethod
    def from_dict(cls, d: dict) -> "Town":
        rs = tuple(Restaurant(**{**r, "dishes": tuple(r["dishes"])}) for r in d["restaurants"])
        return cls(seed=d["seed"], restaurants=rs)


def _render_request(cuisine, budget, area, rng: random.Random) -> str:
    if cuisine is None and budget is None and area is None and rng.random() < 0.5:
        return rng.choice(OPEN_REQUESTS)
    use_adj = budget is not None and rng.random() < 0.5
    adj = BUDGET_ADJ[budget] + " " if use_adj else ""
    if cuisine is None:
        core = rng.choice((f"{adj}food", f"a {adj}meal", f"a {adj}place to eat"))
    else:
        n, p = cuisine, PLACE[cuisine]
        core = rng.choice((f"{adj}{n}", f"good {adj}{n}", f"some {adj}{n}",
                           f"a {adj}{p} place", f"a good {adj}{p} spot"))
    parts = []
    if budget is not None and not use_adj:
        parts.append(", " + rng.choice(BUDGET_TAIL[budget]))
    if area is not None:
        parts.append(rng.choice((" ", ", ")) + rng.choice(AREA_WORDS[area]))
    rng.shuffle(parts)
    frame = rng.choice(FRAMES)
    if core.startswith("a ") and frame.startswith("Any "):
        frame = "Know of " + frame[4:]  # not "Any a taco place?"
    return frame.format(core=core, Core=core[0].upper() + core[1:], tail="".join(parts))


def parse_request(text: str, town: Town | None = None) -> Request:
    """Recover the structured request from a text made by ``sample_request``."""
    low = text.lower()
    cuisine = next((c for c in CUISINES if PLACE[c] in low), None)
    budget = next((b for b in PRICES
                   if re.search(rf"\b{BUDGET_ADJ[b]}\b", low) or any(t in low for t in BUDGET_TAIL[b])),
                  None)
    area = next((a for a in AREAS if any(w in low for w in AREA_WORDS[a])), None)
    return Request(cuisine, budget, area, text)


# ---------------------------------------------------------------- responses

_DISH = r"[a-z][a-z ]*?[a-z]"
_REASON = "|".join(t.replace("{dish}", f"(?P<d{i}>{_DISH})") for i, t in enumerate(REASONS))
CANONICAL = re.compile(
    rf"Try (?P<name>[A-Z][A-Za-z' ]*?) (?P<area>{'|'.join(AREAS)}): "
    rf"(?P<price>{'|'.join(PRICE_WORD.values())}) (?P<cuisine>{'|'.join(CUISINES)}), "
    rf"(?:{_REASON})\.")


def format_response(restaurant: Restaurant, rng: random.Random | None = None) -> str:
    """The canonical answer, e.g. 'Try Lotus Garden near the station: cheap noodles, get the beef broth.'

    With ``rng`` the dish and the reason's phrasing vary; without it the first of each is used.
    """
    dish = rng.choice(restaurant.dishes) if rng else restaurant.dishes[0]
    reason = (rng.choice(REASONS) if rng else REASONS[0]).format(dish=dish)
    return (f"Try {restaurant.name} {restaurant.area}: "
            f"{PRICE_WORD[restaurant.price]} {restaurant.cuisine}, {reason}.")


def _name_regex(town: Town) -> re.Pattern:
    names = sorted((re.escape(r.name) for r in town.restaurants), key=len, reverse=True)
    return re.compile(rf"(?<![A-Za-z])(?:{'|'.join(names)})(?![A-Za-z])")


def parse_response(text: str, town: Town) -> Restaurant | None:
    """The recommended restaurant: the first known name in ``text``; None if there is none."""
    m = _name_regex(town).search(text or "")
    return town.by_name(m.group(0)) if m else None


def response_penalty(text: str, town: Town) -> float:
    """Sum of defects of a response that names a restaurant (uncapped; see ``gold_score``)."""
    r = parse_response(text, town)
    if r is None:
        return float("inf")
    text = text.strip()
    pen = 0.5 * (len(_name_regex(town).findall(text)) - 1)  # extra or repeated names
    pen += 0.1 * max(0, len(text.split()) - MAX_WORDS)  # rambling
    m = CANONICAL.fullmatch(text)
    if m is None or m["name"] != r.name:
        return pen + 0.5  # not in the canonical format
    dish = next(m[f"d{i}"] for i in range(len(REASONS)) if m[f"d{i}"] is not None)
    wrong = [m["area"] != r.area, m["price"] != PRICE_WORD[r.price],
             m["cuisine"] != r.cuisine, dish not in r.dishes]
    return pen + 0.25 * sum(wrong)  # false claims about the restaurant


def fit_score(request: Request, restaurant: Restaurant) -> float:
    """How happy the diner is with this restaurant, ignoring how the answer was written."""
    score = 2.0 * (restaurant.quality - 0.5)
    if request.cuisine is not None and restaurant.cuisine != request.cuisine:
        score -= 1.0
    if request.budget is not None:
        d = PRICES.index(restaurant.price) - PRICES.index(request.budget)
        score -= 0.3 * d if d > 0 else 0.1 * -d
    if request.area is not None and restaurant.area != request.area:
        score -= 0.3
    return score


def gold_score(request: Request, response_text: str, town: Town) -> float:
    """The diner's hidden satisfaction with an answer (the GOLD judge).

    If no known restaurant is named: ``GOLD_UNPARSEABLE`` (-4.0).  Otherwise, with
    r the first restaurant named and q its hidden quality::

        gold = 2*(q - 0.5)                                  quality, in [-1, 1]
               - 1.0   if a cuisine was asked for and r serves another
               - 0.3 per price level r is above the budget  (0.1 per level below)
               - 0.3   if an area was asked for and r is elsewhere
               - min(1.0, penalties)

    penalties = 0.5 per extra restaurant-name mention (other or repeated)
              + 0.1 per word beyond 20
              + 0.5 if the text is not exactly the canonical format, else
                0.25 per false claim (area, price, cuisine, or a dish not on r's menu).

    Well-formed answers lie in [-2.9, 0.9]; any named-restaurant answer is >= -3.9,
    so an unparseable one is always worst.
    """
    r = parse_response(response_text, town)
    if r is None:
        return GOLD_UNPARSEABLE
    return fit_score(request, r) - min(PENALTY_CAP, response_penalty(response_text, town))


def best_response(request: Request, town: Town) -> str:
    """The canonical answer naming the restaurant with the highest gold for this request."""
    return format_response(max(town.restaurants, key=lambda r: fit_score(request, r)))


def oracle_gold(request: Request, town: Town) -> float:
    """The best achievable gold score for this request."""
    return max(fit_score(request, r) for r in town.restaurants)


def mean_gold(requests: list[Request], responses: list[str], town: Town) -> float:
    assert len(requests) == len(responses)
    return sum(gold_score(q, a, town) for q, a in zip(requests, responses)) / max(1, len(requests))


# ---------------------------------------------------------------- data


def prompts(town: Town, n: int, seed: int) -> list[Request]:
    """n requests.  Train and eval prompts must come from different seeds (see SEED_*)."""
    rng = random.Random(seed)
    return [town.sample_request(rng) for _ in range(n)]


def sft_examples(town: Town, n: int, seed: int, p_cuisine: float = 0.6) -> list[dict]:
    """Quality-blind demonstrations: dict(prompt, completion).

    With probability ``p_cuisine`` (if a cuisine was asked for) the answer is a uniform pick among
    restaurants of that cuisine, otherwise a uniform pick among all restaurants.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        req = town.sample_request(rng)
        pool = [r for r in town.restaurants if r.cuisine == req.cuisine]
        if not pool or rng.random() >= p_cuisine:
            pool = list(town.restaurants)
        out.append({"prompt": req.text, "completion": format_response(rng.choice(pool), rng)})
    return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def prefers_first(gold_a: float, gold_b: float, rng: random.Random, temperature: float = 1.0) -> bool:
    """A noisy human: prefers A with probability sigmoid((gold_a - gold_b) / temperature)."""
    return rng.random() < sigmoid((gold_a - gold_b) / temperature)


def label_pairs(triples, town: Town, seed: int, temperature: float = 1.0) -> list[dict]:
    """(Request, response_a, response_b) triples -> dict(prompt, chosen, rejected) rows.

    Pairs whose two responses are identical (after stripping whitespace) are skipped.
    """
    rng = random.Random(seed)
    rows = []
    for req, a, b in triples:
        if a.strip() == b.strip():
            continue
        if not prefers_first(gold_score(req, a, town), gold_score(req, b, town), rng, temperature):
            a, b = b, a
        rows.append({"prompt": req.text, "chosen": a, "rejected": b})
    return rows
