"""A built-in, varied prompt set (chat questions, code, summaries, rewriting) for the demo,
the drift benchmark and `softwatch sweep`: traffic that looks like an assistant's."""

from __future__ import annotations

TOPICS = [
    "unit tests", "password hashing", "the water cycle", "photosynthesis", "compound interest", "black holes",
    "the French Revolution", "vaccines", "supply and demand", "climate change", "sourdough bread", "jet lag",
    "TCP handshakes", "garbage collection", "the Roman Empire", "electric cars", "sleep", "coffee", "volcanoes",
    "binary search", "recycling", "the stock market", "solar panels", "memory leaks",
]

QUESTIONS = [
    "Explain {} to a ten-year-old.",
    "What are three common misconceptions about {}?",
    "Give me a short, practical tip about {}.",
    "Write a haiku about {}.",
    "Why does {} matter? Answer in two sentences.",
]

CODE = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a SQL query that counts orders per customer.",
    "Write a bash one-liner that counts lines in all .py files.",
    "Write a JavaScript function that debounces another function.",
    "Explain what this does: `sorted(d.items(), key=lambda kv: kv[1])`",
    "Write a Python class for a stack with push and pop.",
    "How do I read a JSON file in Python?",
    "Write a regular expression that matches an email address.",
    "What is the difference between a list and a tuple in Python?",
    "Write a Python function that merges two sorted lists.",
    "Fix the bug: `for i in range(len(xs)): xs.remove(xs[i])`",
]

PASSAGES = [
    "The meeting moved from Tuesday to Thursday because two speakers were travelling. Slides are due "
    "Wednesday noon, and the room now holds forty people instead of sixty.",
    "Our checkout service returned errors for twelve minutes after a configuration push raised the connection "
    "pool limit above what the database allowed. Rolling back fixed it.",
    "The library will close for renovation from June to August. Borrowed books can be returned to the "
    "community centre, and the children's reading club meets in the park.",
    "Sales grew eight percent this quarter, driven by the new subscription plan, while hardware revenue fell "
    "because of supply delays that should ease next month.",
    "The trail is six kilometres long with a steep first half. Bring water, start before ten to avoid the heat, "
    "and note that dogs must stay on a leash near the lake.",
    "A new study found that short walks after meals lower blood sugar spikes more than a single long walk "
    "later in the day, especially for people over fifty.",
]

SUMMARIES = [
    "Summarize in one sentence: {}",
    "List the key facts as bullet points: {}",
    "Rewrite this for a formal email: {}",
]


def prompt_set() -> list[str]:
    """Every built-in prompt, in a fixed order (about 170)."""
    prompts = [q.format(t) for t in TOPICS for q in QUESTIONS]
    prompts += CODE
    prompts += [s.format(p) for p in PASSAGES for s in SUMMARIES]
    return prompts


SYSTEM_PROMPTS = {
    "v1": None,
    "v2": "You are a concise assistant. Answer in plain language and keep it short.",
}


def chat_messages(prompt: str, template_version: str = "v1") -> list[dict]:
    """The chat messages of a prompt under a prompt-template version (v2 adds a system prompt)."""
    system = SYSTEM_PROMPTS.get(template_version)
    if template_version not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown template_version {template_version!r}; known: {', '.join(SYSTEM_PROMPTS)}")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
