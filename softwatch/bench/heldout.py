"""The held-out prompts of `bench drift` ("heldout-v1"): tasks x topics x phrasings, a grid of
64,000 distinct prompts less the 8 that are also built-in prompts (prompts.py). Fixed before any setting was
tuned on the benchmark; changing them makes a new version, not a retune.

`heldout_prompts()` lists them in one fixed shuffled order; the benchmark's trials take
consecutive, disjoint runs of that order, so no prompt is seen by two trials and every trial's
prompts are a uniform draw from the same distribution (the same traffic, other prompts)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

VERSION = "heldout-v1"

TASKS = (
    "Explain {}.",
    "Write a short poem about {}.",
    "Give three facts about {}.",
    "Summarize what an expert would say about {}.",
    "What are the pros and cons of {}?",
    "How would you teach {} to a ten-year-old?",
    "Write a tweet about {}.",
    "List common misconceptions about {}.",
    "Describe {} in the style of a news report.",
    "What questions should a beginner ask about {}?",
    "Write a haiku about {}.",
    "Compare {} with something from everyday life.",
    "Tell a very short story that involves {}.",
    "What is the most surprising thing about {}?",
    "Write a product description inspired by {}.",
    "Give a one-sentence definition of {}.",
)

SUBJECTS = (
    "volcanoes", "honeybees", "the printing press", "black holes", "sourdough bread", "glaciers",
    "the Roman aqueducts", "electric cars", "coral reefs", "chess openings", "the human heart",
    "solar panels", "jazz music", "tidal energy", "octopuses", "the silk road", "vaccines",
    "desert plants", "paper money", "lighthouses", "the moon landing", "rainforests",
    "bicycle gears", "the stock market", "origami", "thunderstorms", "ancient Egypt",
    "quantum computers", "wind turbines", "migratory birds", "the periodic table",
    "public libraries", "coffee farming", "earthquakes", "the internet", "penguins",
    "renaissance painting", "recycling plastic", "the water cycle", "mountain climbing",
    "submarines", "the immune system", "tea ceremonies", "satellites", "bamboo",
    "city parks", "the Olympic games", "mushrooms", "railways", "northern lights",
)

ASPECTS = (
    "{}", "the history of {}", "the future of {}", "the science behind {}", "the economics of {}",
    "safety around {}", "myths about {}", "the environmental impact of {}", "famous examples of {}",
    "careers related to {}",
)

PHRASINGS = (
    "", " Keep it brief.", " Use simple words.", " Answer in one paragraph.",
    " Be precise.", " Make it friendly.", " Avoid jargon.", " Be creative.",
)

ORDER_SEED = 20261124  # the fixed shuffle of the prompt grid


def heldout_prompt(index: int) -> str:
    """The prompt at grid position `index` (task, subject, aspect, phrasing)."""
    index, phrasing = divmod(index, len(PHRASINGS))
    index, aspect = divmod(index, len(ASPECTS))
    task, subject = divmod(index, len(SUBJECTS))
    topic = ASPECTS[aspect].format(SUBJECTS[subject])
    return TASKS[task].format(topic) + PHRASINGS[phrasing]


def grid_size() -> int:
    return len(TASKS) * len(SUBJECTS) * len(ASPECTS) * len(PHRASINGS)


@lru_cache(maxsize=1)
def heldout_order() -> np.ndarray:
    """Grid positions in the benchmark's fixed order, without those of built-in prompts."""
    from ..prompts import prompt_set

    builtin = set(prompt_set())
    order = np.random.default_rng(ORDER_SEED).permutation(grid_size())
    return order[[heldout_prompt(int(i)) not in builtin for i in order]]


def heldout_prompts(start: int, count: int) -> list[str]:
    """`count` prompts from position `start` of the fixed order; ValueError past the end."""
    order = heldout_order()
    if start < 0 or start + count > len(order):
        raise ValueError(f"held-out prompts {start}..{start + count} are past the {len(order)} there are")
    return [heldout_prompt(int(i)) for i in order[start:start + count]]
