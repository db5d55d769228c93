"""The vector index: the packaged embedding model, Chroma collections in a temp folder and behind a real
`chroma run` server on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from chroma_helpers import chroma_server as start_chroma_server
from chroma_helpers import free_port

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.settings import Settings, load_settings
from flywheel.store.vectors import (
    MODEL_SHA256,
    Embedder,
    Hit,
    VectorIndex,
    clean_metadata,
    embedding_function,
    model_dir,
    open_index,
    sha256_file,
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def index(settings: Settings, embedder: Embedder) -> Iterator[VectorIndex]:
    handle = open_index(settings, embedder)
    yield handle
    handle.close()


def test_packaged_weights_are_the_upstream_ones() -> None:
    assert sha256_file(model_dir() / "model.safetensors") == MODEL_SHA256


def test_embeddings_are_normalised_and_put_paraphrases_close(embedder: Embedder) -> None:
    texts = ["Where is my refund?", "When will I get my money back?", "How do I reset my password?", ""]
    vectors = embedder.embed(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # the two refund questions are nearer than refund and password
    assert embedder.embed([]).shape == (0, 384)


def test_batching_and_length_sorting_do_not_change_a_vector(embedder: Embedder) -> None:
    texts = ["short", "a much longer sentence about a delayed parcel and an angry customer " * 3, "mid length text here"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    small_batches = Embedder(batch_size=1).embed(texts)
    np.testing.assert_allclose(together, small_batches, atol=1e-5)


def test_weights_with_a_wrong_hash_are_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model"
    fake.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(model_dir() / name, fake / name)
    (fake / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(InfrastructureError, match="sha256"):
        Embedder(fake).embed(["hello"])
    (fake / "model.safetensors").unlink()
    with pytest.raises(InfrastructureError, match="missing"):
        Embedder(fake).embed(["hello"])


def test_metadata_becomes_chroma_scalars() -> None:
    assert clean_metadata({"a": None, "b": 1, "c": [1, 2], "d": np.float32(0.5), "e": "x"}) == {"b": 1, "c": "[1, 2]", "d": 0.5, "e": "x"}
    assert clean_metadata({"a": None}) is None
    assert clean_metadata(None) is None


def test_upsert_query_get_count_delete(index: VectorIndex) -> None:
    index.upsert(
        "kb",
        ["refund", "password", "shipping"],
        ["Refunds reach your card within 5 business days.", "Reset your password from the login page.", "Parcels ship within 2 days."],
        [{"kind": "approved_response", "intent": "refund_status"}, {"kind": "doc", "intent": None}, None],
    )
    assert index.count("kb") == 3
    hits = index.query("kb", "when do I get my money back", k=3)
    assert [h.id for h in hits][0] == "refund"
    assert all(0.0 <= h.similarity <= 1.0 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.similarity)
    assert hits[0].metadata == {"kind": "approved_response", "intent": "refund_status"}
    assert index.get("kb", ids=["password"])[0].metadata == {"kind": "doc"}  # None was dropped

    found = index.get("kb", where={"$and": [{"kind": "approved_response"}, {"intent": "refund_status"}]})
    assert [h.id for h in found] == ["refund"] and found[0].similarity == 1.0
    assert [h.id for h in index.query("kb", "money back", k=5, where={"kind": "doc"})] == ["password"]

    index.upsert("kb", ["refund"], ["Refunds take up to 10 business days."], [{"kind": "policy"}])
    assert index.count("kb") == 3
    assert index.get("kb", ids=["refund"])[0].text == "Refunds take up to 10 business days."

    index.delete("kb", ["shipping"])
    assert index.count("kb") == 2
    assert index.get("kb", ids=[]) == []
    assert index.count("failures") == 0 and index.query("failures", "anything", k=3) == []


def test_query_with_precomputed_embeddings_answers_each_row(index: VectorIndex) -> None:
    texts = ["cancel my subscription", "my parcel never arrived", "change the delivery address"]
    vectors = index.embedder.embed(texts)
    index.upsert("failures", ["f1", "f2", "f3"], texts, [{"rule": "thumbs_down"}] * 3, embeddings=vectors)
    results = index.query_embeddings("failures", vectors, k=2)
    assert [hits[0].id for hits in results] == ["f1", "f2", "f3"]
    assert all(hits[0].similarity == pytest.approx(1.0, abs=1e-4) for hits in results)
    assert index.query_embeddings("failures", np.zeros((0, 384), dtype=np.float32)) == []


def test_collections_use_cosine_space_and_our_embedding_function(index: VectorIndex) -> None:
    config = index.collection("corrections").configuration_json
    assert config["hnsw"]["space"] == "cosine"
    assert config["embedding_function"]["name"] == "flywheel-minilm-l6-v2"
    # Chroma embedding text itself goes through our function, not its downloading default.
    col = index.collection("corrections")
    col.upsert(ids=["c1"], documents=["Your refund is on its way."])
    result = col.query(query_texts=["refund"], n_results=1)
    assert result["ids"] == [["c1"]]
    direct = embedding_function(index.embedder)(["Your refund is on its way."])
    stored = col.get(ids=["c1"], include=["embeddings"])["embeddings"][0]
    np.testing.assert_allclose(np.asarray(direct[0]), np.asarray(stored), atol=1e-5)


def test_unknown_collection_is_a_user_error(index: VectorIndex) -> None:
    with pytest.raises(UserInputError, match="unknown collection"):
        index.count("nope")


def test_the_index_persists_across_clients(settings: Settings, embedder: Embedder) -> None:
    first = open_index(settings, embedder)
    first.upsert("kb", ["a"], ["Opening hours are 9 to 5."], [{"kind": "doc"}])
    first.close()
    second = open_index(settings, embedder)
    try:
        hits = second.query("kb", "when are you open", k=1)
        assert hits[0].id == "a" and hits[0].metadata["kind"] == "doc"
    finally:
        second.close()
    assert (settings.chroma_path / "chroma.sqlite3").is_file()


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[int]:
    with start_chroma_server(tmp_path / "chroma-server") as port:
        yield port


def test_http_client_against_a_real_server(project: Path, chroma_server: int, embedder: Embedder) -> None:
    settings = load_settings(project, chroma={"host": "127.0.0.1", "port": chroma_server})
    index = open_index(settings, embedder)
    try:
        assert index.location == f"http://127.0.0.1:{chroma_server}"
        index.upsert("kb", ["a", "b"], ["Where is my refund?", "Reset a password"], [{"kind": "doc"}, {"kind": "policy"}])
        hits = index.query("kb", "refund status", k=2)
        assert [h.id for h in hits] == ["a", "b"] and isinstance(hits[0], Hit)
        assert not (project / ".flywheel" / "chroma").exists()  # nothing embedded locally
    finally:
        index.close()


def test_unreachable_server_is_an_infrastructure_error(project: Path) -> None:
    settings = load_settings(project, chroma={"host": "127.0.0.1", "port": free_port()})
    with pytest.raises(InfrastructureError, match=r"cannot open the vector index at 127\.0\.0\.1:\d+"):
        open_index(settings)


# The first 8 components of three vectors and two cosines, computed with the hand-written mean pooling that
# came before sentence-transformers (issue 10): stored indexes were built with these, so they must not move.
REFERENCE = {
    "Where is my refund?": [-0.03488, -0.006559, 0.037453, 0.048023, 0.046198, -0.004889, 0.047654, 0.01388],
    "How do I reset my password?": [0.006903, -0.063023, -0.072044, -0.032496, -0.042709, 0.070429, 0.009074, 0.015408],
    "": [-0.118838, 0.048299, -0.002548, -0.011011, 0.051951, 0.010292, 0.115433, 0.000701],
}


def test_vectors_are_the_ones_stored_indexes_were_built_with(embedder: Embedder) -> None:
    texts = [*REFERENCE, "When will I get my money back?"]
    vectors = embedder.embed(texts)
    for row, text in enumerate(REFERENCE):
        np.testing.assert_allclose(vectors[row, :8], REFERENCE[text], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[3]) == pytest.approx(0.60564, abs=1e-5)  # refund, paraphrased
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.248269, abs=1e-5)  # refund, password


def test_long_texts_are_cut_at_256_tokens_and_repeats_are_embedded_once(embedder: Embedder) -> None:
    cut, cut_too, whole = embedder.embed(["x " * 300, "x " * 400, "x " * 100])
    np.testing.assert_array_equal(cut, cut_too)  # both past 256 tokens: the same first 256
    assert float(cut @ whole) < 0.99
    repeated = embedder.embed(["refund", "password", "refund"])
    np.testing.assert_array_equal(repeated[0], repeated[2])
    np.testing.assert_allclose(repeated[1], embedder.embed(["password"])[0], atol=1e-5)
