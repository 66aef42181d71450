"""A seeded latent-factor catalog small enough for a pipeline run in seconds (tests, demos)."""

from __future__ import annotations

import numpy as np

from slimrank.data.dataset import Dataset, FeatureTable, IdMap, Interactions

# Words of the synthetic items' titles (two each, then the item's number).
TITLE_WORDS = ("red", "blue", "night", "river", "star", "garden", "winter", "city")


def synthetic_dataset(n_users: int, n_items: int, per_user: int, seed: int = 0) -> Dataset:
    """Return users who pick ``per_user`` distinct items by softmax of latent affinity.

    Items fall in 4 clusters (the ``genre`` categorical) and users have a numeric ``age``
    that shifts their taste, so side features and co-occurrence both carry signal.
    """
    rng = np.random.default_rng(seed)
    dim = 4
    genre = rng.integers(0, dim, n_items)  # (I,)
    item_vecs = np.eye(dim)[genre] * 2.0 + rng.normal(0, 0.5, (n_items, dim))  # (I, dim)
    age = rng.uniform(18, 70, n_users)  # (U,)
    user_vecs = rng.normal(0, 1.0, (n_users, dim))  # (U, dim)
    user_vecs[:, 0] += (age - 44) / 13  # older users lean to genre 0
    popularity = rng.normal(0, 0.5, n_items)  # (I,)
    logits = user_vecs @ item_vecs.T + popularity  # (U, I)
    # Gumbel top-k draws per_user distinct items from the softmax without replacement.
    picks = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :per_user]
    user = np.repeat(np.arange(n_users), per_user)
    item = picks.reshape(-1)
    timestamp = 1_600_000_000 + rng.permutation(len(user)).astype(np.int64) * 60
    interactions = Interactions(user, item, np.ones(len(user), np.float32), timestamp)
    user_features = FeatureTable(n_users, numeric={"age": age.astype(np.float32)})
    item_features = FeatureTable(
        n_items,
        categorical={"genre": genre.astype(np.int64)},
        cardinality={"genre": dim},
        vocab={"genre": [f"g{g}" for g in range(dim)]},
    )
    # Titles from their own generator, so the interactions stay those of earlier versions.
    words = np.random.default_rng(seed + 1).integers(0, len(TITLE_WORDS), (n_items, 2))
    titles = np.asarray(
        [f"{TITLE_WORDS[a]} {TITLE_WORDS[b]} {i}" for i, (a, b) in enumerate(words)], dtype=str
    )
    return Dataset(
        name="synthetic",
        users=IdMap([f"u{u}" for u in range(n_users)]),
        items=IdMap([f"i{i}" for i in range(n_items)]),
        interactions=interactions,
        user_features=user_features,
        item_features=item_features,
        item_titles=titles,
    )
