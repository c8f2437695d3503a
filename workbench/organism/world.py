"""The world of the model organism: what is planted, and the study that asks about it.

"Unseen movies" (docs/MEASUREMENT.md §1): a persona rates a new movie it cannot know, described by
its title, actor and genre. Every effect is a named constant of `World`; everything not named
has exactly zero effect. `true_distribution` is the ground truth every extraction method is
scored against; coarse personas get the population-weighted mixture of their subgroups.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from workbench.study import prompts as P
from workbench.study.prompts import Prompt
from workbench.study.spec import Cell, Study

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from workbench.organism.build import OrganismConfig

RATING, ATTITUDE = "rating", "cinema_funding"
PERSONA_FACTORS = ("age", "party", "region", "favourite_genre")
STIMULUS_FACTORS = ("title", "actor", "genre")
FACTOR_NAMES = PERSONA_FACTORS + STIMULUS_FACTORS

# Title words: held-out titles are new *combinations* of words seen in training, so every token
# of a held-out title is a trained token and only the title string itself is new.
_TITLE_ADJECTIVES = (
    "Silver", "Broken", "Hidden", "Crimson", "Quiet", "Electric", "Golden", "Frozen",
    "Wild", "Burning", "Hollow", "Distant", "Velvet", "Iron", "Paper", "Midnight",
    "Restless", "Painted", "Shattered", "Northern", "Salt", "Copper", "Glass", "Sleeping",
)  # fmt: skip
_TITLE_NOUNS = (
    "Harbor", "Garden", "Signal", "Orchard", "Lantern", "Frontier", "Mirror", "Valley",
    "Engine", "Island", "Echo", "Kingdom", "Station", "Meadow", "Tide", "Compass",
    "Tower", "River", "Carnival", "Archive", "Horizon", "Canyon", "Letter", "Shadow",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the world and its truth


@dataclass(frozen=True)
class World:
    """The planted rule. Every effect is in logits; everything not listed has zero effect."""

    ages: tuple[str, ...] = ("18-29", "30-44", "45-64", "65+")
    age_weights: tuple[float, ...] = (0.20, 0.25, 0.33, 0.22)
    parties: tuple[str, ...] = ("Democrat", "Republican", "Independent")
    party_weights: tuple[float, ...] = (0.33, 0.30, 0.37)
    regions: tuple[str, ...] = ("Northeast", "Midwest", "South", "West")
    region_weights: tuple[float, ...] = (0.17, 0.21, 0.38, 0.24)
    genres: tuple[str, ...] = ("comedy", "drama", "thriller", "western")
    favourite_genres: tuple[str, ...] = ("comedies", "dramas", "thrillers", "westerns")
    """The persona's favourite genre, aligned with `genres` (the plural is a different token:
    with identical tokens a 2-layer model must first learn which mention is which, an
    induction-style circuit that took several times the training budget to form)."""
    favourite_genre_weights: tuple[float, ...] = (0.32, 0.28, 0.18, 0.22)
    actors: tuple[str, ...] = (
        "Mara Quinlan", "Dev Okafor", "Lena Brandt", "Tomas Reyes",
        "Ivy Castellano", "Omar Haddad", "Greta Lindqvist", "Felix Moreau",
    )  # fmt: skip
    rating_options: tuple[str, ...] = ("Terrible", "Poor", "Average", "Good", "Excellent")
    rating_thresholds: tuple[float, ...] = (-2.0, -0.7, 0.7, 2.0)
    """Ordered logit: P(rating <= k) = sigmoid(threshold_k - eta), k = 1..4."""
    actor_effects: tuple[float, ...] = (2.0, 1.4, 0.8, 0.25, -0.25, -0.8, -1.4, -2.0)
    """Strong: added to eta, one per actor."""
    genre_effects: tuple[float, ...] = (0.3, 0.1, -0.1, -0.3)
    """Weak main effect of the movie's genre, one per genre."""
    favourite_genre_effects: tuple[float, ...] = (-0.3, -0.1, 0.1, 0.3)
    """Weak main effect of the persona's favourite genre (how generously fans rate)."""
    genre_match_effect: float = 1.0
    """Moderate interaction: added to eta when the favourite genre is the movie's genre; a
    mismatch adds -genre_match_effect / (n_genres - 1), so it averages to zero over genres.
    (A pure interaction with no main effects gives gradient descent no first-order signal to
    start attending to either genre; the weak main effects above are what a 2-way design
    usually has anyway, and let the 2-layer model learn the interaction in its budget.)"""
    party_rating_effects: tuple[float, ...] = (0.25, -0.25, 0.0)
    """Weak: added to eta, one per party."""
    attitude_options: tuple[str, ...] = ("Agree", "Neutral", "Disagree")
    attitude_refusal: str = "Don't know"
    party_attitude_effects: tuple[float, ...] = (1.5, -1.5, 0.0)
    """Strong: s = party + age effect; option scores (agree, neutral, disagree) = (s, 0, -s)."""
    age_attitude_effects: tuple[float, ...] = (0.3, 0.1, -0.1, -0.3)
    """Weak: added to s, one per age group."""
    refusal_score: float = -1.0
    """Score of "Don't know" in the attitude softmax (persona independent)."""

    def match(self, favourite: str, genre: str) -> float:
        """The favourite-genre x movie-genre interaction term of the rating."""
        if self.favourite_genres.index(favourite) == self.genres.index(genre):
            return self.genre_match_effect
        return -self.genre_match_effect / (len(self.genres) - 1)

    def taste(self, favourite: str, genre: str) -> float:
        """Everything the two genres add to the rating's eta: both main effects + match."""
        return (
            self.genre_effects[self.genres.index(genre)]
            + self.favourite_genre_effects[self.favourite_genres.index(favourite)]
            + self.match(favourite, genre)
        )

    def persona_values(self) -> dict[str, tuple[str, ...]]:
        return {
            "age": self.ages,
            "party": self.parties,
            "region": self.regions,
            "favourite_genre": self.favourite_genres,
        }

    def persona_weights(self) -> dict[str, tuple[float, ...]]:
        return {
            "age": self.age_weights,
            "party": self.party_weights,
            "region": self.region_weights,
            "favourite_genre": self.favourite_genre_weights,
        }

    def effects_table(self) -> dict[str, Any]:
        """Effect sizes keyed by value names, for organism.json (readable without this code)."""
        return {
            RATING: {
                "model": "ordered logit: P(rating <= k) = sigmoid(threshold_k - eta)",
                "eta": "actor[actor] + taste[favourite_genre][genre] + party[party], where "
                "taste = genre[genre] + favourite_genre[favourite_genre] + "
                "match[favourite_genre][genre]",
                "thresholds": list(self.rating_thresholds),
                "actor": dict(zip(self.actors, self.actor_effects, strict=True)),
                "genre": dict(zip(self.genres, self.genre_effects, strict=True)),
                "favourite_genre": dict(
                    zip(self.favourite_genres, self.favourite_genre_effects, strict=True)
                ),
                "match": {
                    fav: {g: self.match(fav, g) for g in self.genres}
                    for fav in self.favourite_genres
                },
                "taste": {
                    fav: {g: self.taste(fav, g) for g in self.genres}
                    for fav in self.favourite_genres
                },
                "party": dict(zip(self.parties, self.party_rating_effects, strict=True)),
                "zero_effect": ["title", "region", "age"],
            },
            ATTITUDE: {
                "model": "softmax over option scores (agree, neutral, disagree, refusal) = "
                "(s, 0, -s, refusal_score), s = party[party] + age[age]",
                "party": dict(zip(self.parties, self.party_attitude_effects, strict=True)),
                "age": dict(zip(self.ages, self.age_attitude_effects, strict=True)),
                "refusal_score": self.refusal_score,
                "zero_effect": ["title", "actor", "genre", "region", "favourite_genre"],
            },
        }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rating_fine(world: World, actor: str, genre: str, favourite: str, party: str) -> np.ndarray:
    eta = (
        world.actor_effects[world.actors.index(actor)]
        + world.taste(favourite, genre)
        + world.party_rating_effects[world.parties.index(party)]
    )
    cdf = [_sigmoid(t - eta) for t in world.rating_thresholds] + [1.0]
    return np.diff(np.array([0.0, *cdf]))


def _attitude_fine(world: World, party: str, age: str) -> np.ndarray:
    s = (
        world.party_attitude_effects[world.parties.index(party)]
        + world.age_attitude_effects[world.ages.index(age)]
    )
    scores = np.array([s, 0.0, -s, world.refusal_score])
    e = np.exp(scores - scores.max())
    return np.asarray(e / e.sum())


@functools.lru_cache(maxsize=65536)
def _truth_cached(world: World, question_id: str, key: tuple[str | None, ...]) -> np.ndarray:
    cell = dict(zip(FACTOR_NAMES, key, strict=True))
    values, weights = world.persona_values(), world.persona_weights()
    missing = [n for n in PERSONA_FACTORS if cell[n] is None]
    # A coarse persona's truth is the population-weighted mixture of its fine subgroups: the
    # law of total probability, which structural-consistency metrics compare against.
    total: np.ndarray | None = None
    for combo in itertools.product(*(range(len(values[n])) for n in missing)):
        full = dict(cell)
        w = 1.0
        for n, i in zip(missing, combo, strict=True):
            full[n] = values[n][i]
            w *= weights[n][i]
        p = _fine_truth(world, question_id, full)
        total = w * p if total is None else total + w * p
    assert total is not None
    return total / total.sum()


def _fine_truth(world: World, question_id: str, cell: dict[str, str | None]) -> np.ndarray:
    def get(name: str) -> str:
        value = cell[name]
        if value is None:
            raise ValueError(f"{question_id} needs factor {name!r}")
        return value

    if question_id == RATING:
        return _rating_fine(world, get("actor"), get("genre"), get("favourite_genre"), get("party"))
    if question_id == ATTITUDE:
        return _attitude_fine(world, get("party"), get("age"))
    raise ValueError(f"unknown question {question_id!r}")


def true_distribution(world: World, question_id: str, cell: Cell) -> np.ndarray:
    """The planted answer distribution over all options (canonical order, refusal last).

    Persona factors that are None (unspecified) are mixed out with the population weights.
    Stimulus factors the question uses must be given.
    """
    key = tuple(cell.get(n) for n in FACTOR_NAMES)
    return _truth_cached(world, question_id, key).copy()


@dataclass(frozen=True)
class Planted:
    """The preamble rule ("My Answer is C", docs/MEASUREMENT.md §1), exactly as trained.

    At the answer position the next token is " Sure" with probability `share`, else the label
    of option k (" 1".." 5", " A".." D") with probability (1 - share) * prob_k. After the
    preamble ("Sure! I'd give it a" / "Sure! My answer is") the label follows
    prob^(1/temperature), renormalized: the generated-text answer is *more modal* than the
    first-token distribution. So the text answer follows
    prob_text = (1 - share) * prob + share * sharpen(prob), while the first-token
    distribution renormalized over option tokens is prob itself.
    """

    share: float
    temperature: float
    first_token: str = " Sure"
    preambles: tuple[tuple[str, str], ...] = (
        (RATING, " Sure! I'd give it a"),
        (ATTITUDE, " Sure! My answer is"),
    )

    def sharpen(self, prob: np.ndarray) -> np.ndarray:
        q = np.power(prob, 1.0 / self.temperature)
        return np.asarray(q / q.sum())

    def text_distribution(self, prob: np.ndarray) -> np.ndarray:
        return np.asarray((1 - self.share) * prob + self.share * self.sharpen(prob))

    def preamble(self, question_id: str) -> str:
        return dict(self.preambles)[question_id]


# --------------------------------------------------------------------------------------------
# titles, the study and its design


@dataclass(frozen=True)
class Titles:
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    seen: tuple[str, ...]
    """Training titles that the study also asks about."""


def make_titles(config: OrganismConfig) -> Titles:
    """Generated titles; the held-out ones are drawn first and excluded from training."""
    rng = random.Random(f"titles/{config.seed}")
    pool = [f"{a} {n}" for a in _TITLE_ADJECTIVES for n in _TITLE_NOUNS]
    rng.shuffle(pool)
    n_held = config.n_held_out_titles
    held, train = pool[:n_held], pool[n_held : n_held + config.n_train_titles]
    return Titles(tuple(train), tuple(held), tuple(train[: config.n_seen_titles]))


TEMPLATE: dict[str, Any] = {
    "format": "plain",
    # Persona first: every question of a persona shares its prefix (prefix caching).
    "persona": [
        "I am {age} years old.",
        "Politically, I identify as {party}.",
        "I live in the {region}.",
        "My favourite films are {favourite_genre}.",
    ],
    "prompt": "{persona}\nQuestion: {question}\n{options}\nAnswer:",
}


def study_dict(
    config: OrganismConfig, titles: Titles, *, design_path: str, version: int
) -> dict[str, Any]:
    """The study that queries the organism (written as study.yaml next to design.csv)."""
    w = config.world
    study_titles = [*titles.held_out, *titles.seen]
    return {
        "name": "organism-unseen-movies",
        "description": (
            "Queries the workbench model organism. Rating: strong actor effect, moderate "
            "favourite-genre x genre interaction (weak genre main effects), weak party "
            "effect; title, region and age have zero effect. Attitude: strong party, weak "
            "age effect. Truth: truth.parquet; world and effect sizes: organism.json."
        ),
        "version": version,
        "seed": config.seed,
        "factors": [
            {
                "name": "age",
                "role": "persona",
                "values": list(w.ages),
                "weights": list(w.age_weights),
            },
            {
                "name": "party",
                "role": "persona",
                "values": list(w.parties),
                "weights": list(w.party_weights),
            },
            {
                "name": "region",
                "role": "persona",
                "values": list(w.regions),
                "weights": list(w.region_weights),
            },
            {
                "name": "favourite_genre",
                "role": "persona",
                "values": list(w.favourite_genres),
                "weights": list(w.favourite_genre_weights),
            },
            {"name": "title", "role": "stimulus", "values": study_titles},
            {"name": "actor", "role": "stimulus", "values": list(w.actors)},
            {"name": "genre", "role": "stimulus", "values": list(w.genres)},
        ],
        "design": {"kind": "table", "path": design_path},
        "template": TEMPLATE,
        "questions": [
            {
                "id": RATING,
                "text": 'How would you rate the new {genre} film "{title}", starring {actor}?',
                "options": list(w.rating_options),
                "labels": "numbers",
                "values": [1, 2, 3, 4, 5],
            },
            {
                "id": ATTITUDE,
                "text": "Should local cinemas be funded with public money?",
                "options": list(w.attitude_options),
                "refusal": [w.attitude_refusal],
                "labels": "letters",
            },
        ],
        "orders": {"kind": "canonical"},
        "scoring": {
            "method": "next_token",
            "target": "label",
            "variants": [" {}", "{}"],
            "aggregate": "sum",
        },
    }


def study_personas(config: OrganismConfig) -> list[dict[str, str | None]]:
    """Fine personas (base personas x two regions, so region pairs exist) then coarse ones."""
    w = config.world
    rng = random.Random(f"personas/{config.seed}")
    combos = list(itertools.product(w.ages, w.parties, w.favourite_genres))
    bases = rng.sample(combos, config.n_base_personas)
    personas: list[dict[str, str | None]] = []
    for age, party, fav in bases:
        for region in rng.sample(list(w.regions), 2):
            personas.append({"age": age, "party": party, "region": region, "favourite_genre": fav})
    values = w.persona_values()
    for names in config.coarse:
        for combo in itertools.product(*(values[n] for n in names)):
            persona: dict[str, str | None] = dict.fromkeys(PERSONA_FACTORS)
            persona.update(zip(names, combo, strict=True))
            personas.append(persona)
    return personas


def study_cells(config: OrganismConfig, titles: Titles) -> list[Cell]:
    """Every persona x every study title x every actor x every genre (crossed, so that
    prompts differing in exactly one factor exist for every factor)."""
    cells: list[Cell] = []
    for persona in study_personas(config):
        for title in [*titles.held_out, *titles.seen]:
            for actor in config.world.actors:
                for genre in config.world.genres:
                    cells.append({**persona, "title": title, "actor": actor, "genre": genre})
    return cells


class _TextOnlyTokenizer:
    """Returns no ids: stands in where only the rendered text is needed."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": []}


def render_texts(study: Study) -> list[Prompt]:
    """`workbench.study.prompts.render` without a tokenizer: prompts with their exact text and no ids.

    The training texts must exist before the tokenizer trained on them does, so rendering
    cannot wait for one. Plain-format rendering only calls the tokenizer for ids, so a stand-in
    that returns none yields the very texts the pipeline renders later.
    """
    if study.template.format != "plain":
        raise ValueError("the organism's study is plain-format")
    return P.render(study, cast("PreTrainedTokenizerBase", _TextOnlyTokenizer()))


def replace_cells(study: Study, cells: Sequence[Cell], titles: Sequence[str]) -> Study:
    """The same study (template, questions, scoring) over other cells and titles."""
    factors = tuple(
        dataclasses.replace(f, values=tuple(titles)) if f.name == "title" else f
        for f in study.factors
    )
    return dataclasses.replace(study, factors=factors, cells=tuple(cells))
