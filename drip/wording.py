"""Words that must not show where others can read them: subjects and preheaders (the linter,
DESIGN §7) and the From display name (DRIP_FROM, in settings), which lock screens and shared
inboxes show. A module of its own, so settings and the linter both read the one list."""

from __future__ import annotations

import re

_DRUGS = (
    "ketamine", "esketamine", "arketamine", "spravato", "ketalar", "psilocybin", "mdma", "lsd",
    "antidepressant", "ssri", "snri", "benzodiazepine", "opioid", "lithium",
)  # fmt: skip
_CONDITIONS = (
    "depression", "depressed", "depressive", "anxiety", "anxious", "ptsd", "post-traumatic",
    "ocd", "obsessive-compulsive", "bipolar", "mania", "manic", "schizophrenia", "psychosis",
    "psychotic", "pain", "painful", "chronic pain", "suicide", "suicidal", "self-harm",
    "mental health", "mental illness", "psychiatric", "psychiatry", "psychiatrist",
    "treatment-resistant", "trauma", "traumatic", "addiction", "addicted", "overdose",
    "withdrawal", "relapse", "substance use", "alcoholism", "sobriety", "eating disorder",
    "anorexia", "bulimia", "disorder", "diagnosis", "diagnosed",
)  # fmt: skip
_TREATMENTS = (
    "infusion", "iv", "intravenous", "psychedelic", "anesthetic", "anaesthetic", "anesthesia",
    "dissociative", "dissociation", "dose", "dosing", "dosage", "nasal spray", "electroconvulsive",
)  # fmt: skip
SENSITIVE_WORDS: tuple[str, ...] = _DRUGS + _CONDITIONS + _TREATMENTS
"""Words no subject or preheader may contain: matched as whole words (plurals too), ignoring case,
also inside hyphenated words ("ketamine-assisted"); a space or hyphen in an entry matches either."""


def _word_pattern(word: str) -> re.Pattern[str]:
    parts = (re.escape(part) for part in re.split(r"[\s-]+", word))
    return re.compile(r"(?<![\w])" + r"[\s-]+".join(parts) + r"(?:s|es)?(?![\w])", re.IGNORECASE)


_SENSITIVE = tuple((word, _word_pattern(word)) for word in SENSITIVE_WORDS)


def sensitive_words(text: str) -> list[str]:
    """The entries of SENSITIVE_WORDS that `text` contains."""
    return [word for word, pattern in _SENSITIVE if pattern.search(text)]
