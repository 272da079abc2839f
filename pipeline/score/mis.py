"""The Machine Interpretability Score (Zimmermann, Klindt & Brendel 2024) of one unit over image embeddings.

The task is Borowski et al.'s (2021) two-alternative forced choice: given a unit's K maximally activating
reference images R+ and K minimally activating reference images R-, which of two query images, q+ (strongly
activating) or q- (weakly activating), activates the unit more? The paper's fixed task model answers with a
perceptual similarity s (cosine similarity of embeddings here; the embeddings arrive unit-normalised):

    S(q, R)  = mean_j s(q, R_j)                      (the mean similarity to a reference set)
    D        = [S(q+, R+) - S(q+, R-)] - [S(q-, R+) - S(q-, R-)]
    p        = sigmoid(D / temperature)              (the probability of the correct choice)
    MIS      = mean over the unit's tasks of p;  accuracy = share of tasks with D > 0 (D == 0 counts half)

Where the images come from (pipeline.score.runner): references are the unit's top ranks 0..K-1 and bottom ranks
0..K-1; task n's queries are top rank K+n and bottom rank K+n, so a query is never a reference and every query is
less extreme than every reference of its side (the paper's choice: the query is the least extreme of the K+1
images a task draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The task sizes of the paper's setting (K references per side; tasks per unit).
REFERENCES = 9
TASKS = 20
TEMPERATURE = 0.16


@dataclass(frozen=True)
class UnitScore:
    mis: float
    accuracy: float
    tasks: int
    probabilities: np.ndarray  # (tasks,) probability of the correct choice, task by task


def tasks_available(top_rows: int, bottom_rows: int, references: int, tasks: int) -> int:
    """How many tasks a unit with this many top and bottom rows supports (0: none)."""
    return max(0, min(tasks, top_rows - references, bottom_rows - references))


def unit_score(top: np.ndarray, bottom: np.ndarray, references: int, temperature: float) -> UnitScore:
    """MIS of one unit. top, bottom: (references + tasks, d) embeddings of the unit's top and bottom images in
    rank order (rank 0 most / least activating), unit-normalised."""
    n = min(len(top), len(bottom)) - references
    if n < 1:
        raise ValueError(f"a task needs more than {references} top and bottom images, got {len(top)}/{len(bottom)}")
    top, bottom = np.asarray(top, np.float64), np.asarray(bottom, np.float64)
    plus_refs, minus_refs = top[:references], bottom[:references]
    queries_plus, queries_minus = top[references : references + n], bottom[references : references + n]
    # The mean similarity to a set is the similarity to the set's mean embedding (a dot product is linear).
    centre_plus, centre_minus = plus_refs.mean(axis=0), minus_refs.mean(axis=0)
    delta_plus = queries_plus @ centre_plus - queries_plus @ centre_minus
    delta_minus = queries_minus @ centre_plus - queries_minus @ centre_minus
    difference = delta_plus - delta_minus
    probabilities = 1.0 / (1.0 + np.exp(-difference / temperature))
    accuracy = float(np.mean((difference > 0) + 0.5 * (difference == 0)))
    return UnitScore(float(probabilities.mean()), accuracy, n, probabilities)
