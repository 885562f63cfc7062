"""Small generated MovieLens-like data (ratings, users, items frames) for tests and smoke runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
WORDS = ("star", "love", "night", "dead", "city", "man", "war", "story", "girl", "space")


@dataclass
class SyntheticMovieLens:
    ratings: pd.DataFrame  # user_id, item_id, rating, timestamp
    users: pd.DataFrame  # user_id, gender, age, occupation, zip
    items: pd.DataFrame  # item_id, title, year, genres


def make_synthetic_movielens(num_users: int = 300, num_items: int = 80, max_ratings: int = 120,
                             seed: int = 0) -> SyntheticMovieLens:
    """Ratings from a 4-factor model whose item factors follow the genres, with item popularity
    spread from a handful to ``max_ratings`` ratings (so both old and new items exist for
    small ``N``, ``K``)."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({
        "user_id": np.arange(1, num_users + 1),
        "gender": rng.choice(["F", "M"], num_users),
        "age": rng.choice([1, 18, 25, 35, 45, 50, 56], num_users),
        "occupation": rng.integers(0, 21, num_users),
        "zip": [f"{z:05d}" for z in rng.integers(0, 99999, num_users)],
    })
    genre_factor = rng.normal(size=(len(GENRES), 4))
    item_genres, titles, item_f = [], [], []
    for i in range(num_items):
        g = sorted(set(rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False).tolist()))
        item_genres.append([GENRES[j] for j in g])
        item_f.append(genre_factor[g].mean(0) + 0.3 * rng.normal(size=4))
        words = rng.choice(WORDS, size=rng.integers(1, 4), replace=False)
        titles.append(" ".join(w.capitalize() for w in words) + f" ({1980 + i % 20})")
    items = pd.DataFrame({
        "item_id": np.arange(1, num_items + 1),
        "title": titles,
        "year": [1980 + i % 20 for i in range(num_items)],
        "genres": item_genres,
    })
    item_f = np.stack(item_f)
    user_f = rng.normal(size=(num_users, 4))
    bias = rng.normal(scale=0.5, size=num_items)
    counts = np.clip((max_ratings * rng.power(0.6, num_items)).astype(int), 3, min(max_ratings, num_users))
    rows = []
    for i in range(num_items):
        raters = rng.choice(num_users, size=counts[i], replace=False)
        score = user_f[raters] @ item_f[i] + bias[i] + rng.normal(scale=0.5, size=counts[i])
        rating = np.clip(np.round(3.5 + score), 1, 5).astype(int)
        ts = 1_000_000 + rng.integers(0, 10_000_000, counts[i])
        rows.append(pd.DataFrame({"user_id": raters + 1, "item_id": i + 1, "rating": rating, "timestamp": ts}))
    ratings = pd.concat(rows, ignore_index=True)
    return SyntheticMovieLens(ratings, users, items)
