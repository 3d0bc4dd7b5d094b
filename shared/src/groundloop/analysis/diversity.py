"""How alike a search's ideas are: pairwise cosine similarity of their texts, and the
fraction of distinct ideas.

Measures (`choose_measure(spec)`):

    None / "auto"   WordLlama (the `wordllama` package: the extra groundloop-shared[analysis],
                    which the CLI and the API install; 256-d static sentence embeddings whose
                    weights ship inside its wheel, so it works with no network); TF-IDF, with
                    a note saying so, when it is not installed
    "wordllama"     WordLlama, refused when the package is missing
    "tfidf"         TF-IDF cosine over the search's own idea texts (pure Python)
    a local folder  a sentence-transformers model (has modules.json; needs the
                    `sentence-transformers` package) or a model2vec model (needs `model2vec`)

Each measure turns a list of texts into their full similarity matrix in one go, so TF-IDF's
document frequencies are those of the whole search, not of one generation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

WORDLLAMA_INSTALL = "pip install 'groundloop-shared[analysis]'"
_WORD = re.compile(r"[a-z0-9_]+")


class DiversityError(ValueError):
    """A similarity measure that cannot be used here; the message says how to fix it."""


class SimilarityMeasure(Protocol):
    name: str  # what analysis.md names as the measure
    note: str  # "" or why this measure and not a better one

    def similarities(self, texts: Sequence[str]) -> list[list[float]]: ...


def normalized(text: str) -> str:
    """An idea's text as compared for distinctness: lower case, words only."""
    return " ".join(_WORD.findall(text.lower()))


def distinct_fraction(texts: Sequence[str]) -> float | None:
    """Distinct ideas ÷ ideas, two ideas being the same when their normalized texts are."""
    if not texts:
        return None
    return len({normalized(t) for t in texts}) / len(texts)


def mean_pairwise(matrix: Sequence[Sequence[float]], indices: Sequence[int]) -> float | None:
    """Mean similarity over the distinct pairs of `indices`; None with fewer than two."""
    pairs = [(i, j) for n, i in enumerate(indices) for j in indices[n + 1 :]]
    if not pairs:
        return None
    return math.fsum(matrix[i][j] for i, j in pairs) / len(pairs)


# ---------------------------------------------------------------------------- TF-IDF


@dataclass
class TfidfSimilarity:
    """Cosine of TF-IDF vectors: raw term counts times smoothed inverse document frequency
    ln((1 + n) / (1 + df)) + 1, each vector of unit length. Words in common weigh more the
    rarer they are among the texts; texts with no word in common score 0."""

    name: str = "TF-IDF cosine"
    note: str = ""

    def similarities(self, texts: Sequence[str]) -> list[list[float]]:
        counts = [Counter(_WORD.findall(t.lower())) for t in texts]
        df = Counter(word for c in counts for word in c)
        n = len(texts)
        vectors = []
        for c in counts:
            v = {w: k * (math.log((1 + n) / (1 + df[w])) + 1) for w, k in c.items()}
            norm = math.sqrt(math.fsum(x * x for x in v.values())) or 1.0
            vectors.append({w: x / norm for w, x in v.items()})
        return [[_sparse_dot(a, b) for b in vectors] for a in vectors]


def _sparse_dot(a: dict[str, float], b: dict[str, float]) -> float:
    if len(b) < len(a):
        a, b = b, a
    return math.fsum(x * b[w] for w, x in a.items() if w in b)


# ---------------------------------------------------------------------------- embeddings


@dataclass
class EmbeddingSimilarity:
    """Cosine of sentence embeddings from `encode` (texts -> a 2-D array-like)."""

    name: str
    encode: Any
    note: str = ""

    def similarities(self, texts: Sequence[str]) -> list[list[float]]:
        import numpy as np

        if not texts:
            return []
        vectors = np.asarray(self.encode(list(texts)), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.where(norms == 0, 1.0, norms)
        return np.clip(unit @ unit.T, -1.0, 1.0).tolist()


def wordllama_measure() -> EmbeddingSimilarity:
    """WordLlama's bundled model, loaded from the package folder with downloads off (its
    loader looks for the bundled tokenizer under another folder name and would otherwise try
    to fetch it)."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        raise DiversityError(
            f"the wordllama package is not installed: {WORDLLAMA_INSTALL} (or use --embedding-model tfidf)"
        ) from None
    package = Path(wordllama.__file__).parent
    try:
        model = WordLlama.load(cache_dir=package, disable_download=True)
    except (FileNotFoundError, OSError) as exc:
        raise DiversityError(
            f"wordllama is installed without its bundled weights ({exc}); reinstall it: "
            "pip install --force-reinstall wordllama"
        ) from None
    return EmbeddingSimilarity("WordLlama l2_supercat 256-d embeddings, cosine", model.embed)


def local_model_measure(path: Path) -> EmbeddingSimilarity:
    """A model in a local folder: sentence-transformers (modules.json) or model2vec."""
    if not path.is_dir():
        raise DiversityError(
            f"--embedding-model {path}: no such folder; give 'wordllama', 'tfidf' or the folder "
            "of a sentence-transformers or model2vec model"
        )
    if (path / "modules.json").is_file():
        try:
            from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]
        except ImportError:
            raise DiversityError(
                f"{path} is a sentence-transformers model but the package is not installed: "
                "pip install sentence-transformers"
            ) from None
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        return EmbeddingSimilarity(f"sentence-transformers {path.name}, cosine", model.encode)
    try:
        from model2vec import StaticModel  # type: ignore[import-not-found]
    except ImportError:
        raise DiversityError(
            f"{path} has no modules.json, so it is read as a model2vec model, but model2vec "
            "is not installed: pip install model2vec"
        ) from None
    static = StaticModel.from_pretrained(str(path))
    return EmbeddingSimilarity(f"model2vec {path.name}, cosine", static.encode)


def choose_measure(spec: str | None = None) -> SimilarityMeasure:
    """The measure `spec` names (see the module doc); DiversityError when it cannot be used."""
    if spec in (None, "", "auto"):
        try:
            return wordllama_measure()
        except DiversityError as exc:
            return TfidfSimilarity(
                note=f"TF-IDF, no embedding model installed ({exc}): {WORDLLAMA_INSTALL} "
                "to use sentence embeddings"
            )
    if spec == "tfidf":
        return TfidfSimilarity(note="TF-IDF, as asked (--embedding-model tfidf)")
    if spec == "wordllama":
        return wordllama_measure()
    return local_model_measure(Path(str(spec)).expanduser())
