"""The built-in backend: a tiny local model and two LoRA adapters (real PEFT), registered as versions and
served by the gateway with the base loaded once; adapters switch with the registry's aliases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langchain_openai import ChatOpenAI
from serve_helpers import Running, chat, running_gateway, wait_until

from flywheel.errors import UserInputError
from flywheel.inference.local_model import LocalModel
from flywheel.release import registry
from flywheel.serve.backends import BuiltinBackend
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I would like a refund for my last order."}]


@pytest.fixture(scope="module")
def base(tiny_model_dir_h64: Path) -> Path:
    return tiny_model_dir_h64  # built once per session (tests/conftest.py)


def _adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero weights (PEFT leaves B at zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, use_safetensors=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(base, root / "a2", 2), _adapter(base, root / "a3", 3)


@pytest.fixture(scope="module")
def local_model(base: Path) -> LocalModel:
    return LocalModel(base)


@pytest.fixture
def gw(store: Store, base: Path, adapters: tuple[Path, Path], local_model: LocalModel) -> Iterator[Running]:
    registry.register_base(store, str(base))  # v1: the base model, champion
    v2 = registry.register_version(store, base_model=str(base), adapter_path=adapters[0])
    registry.register_version(store, base_model=str(base), adapter_path=adapters[1])  # v3
    registry.switch_alias(store, "champion", v2.id, actor="test", reason="serve v2", effect_key="test:v2")
    with running_gateway(store, BuiltinBackend(local_model, max_new_tokens=12, batch_size=4)) as running:
        yield running


def test_openai_client_gets_the_adapters_answers(gw: Running, store: Store, local_model: LocalModel) -> None:
    client = gw.client()
    weights = local_model.model.get_base_model().model.embed_tokens.weight
    pointer = weights.data_ptr()
    raw = client.chat.completions.with_raw_response.create(model="champion", messages=QUESTION, max_tokens=8, user="u1")
    answer = raw.parse()
    assert raw.headers["x-flywheel-model-version"] == "v2" and answer.model == "v2"
    served = {
        vid: client.chat.completions.create(model=vid, messages=QUESTION, max_tokens=8).choices[0].message.content for vid in ("v1", "v3")
    }
    served["v2"] = answer.choices[0].message.content
    # the same model called directly, with each adapter (v3 was loaded by the request that named it)
    expected = {vid: local_model.generate([QUESTION], max_new_tokens=8, adapter=vid)[0].text for vid in ("v2", "v3")}
    expected["v1"] = local_model.generate([QUESTION], max_new_tokens=8, adapter=None)[0].text
    assert len(set(expected.values())) == 3  # three different models: the test can tell them apart
    assert served == expected
    assert answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 5
    # the promotion of v3 reaches the next requests without a restart, and the base was never reloaded
    registry.switch_alias(store, "champion", "v3", actor="test", reason="promote v3", effect_key="test:v3")
    wait_until(lambda: chat(gw.http(), max_tokens=2).headers["x-flywheel-model-version"] == "v3")
    assert client.chat.completions.create(model="champion", messages=QUESTION, max_tokens=8).choices[0].message.content == expected["v3"]
    assert gw.gateway.backend.model is local_model and local_model.model.get_base_model().model.embed_tokens.weight.data_ptr() == pointer
    assert set(local_model.adapters) == {"v2", "v3"}
    gw.settle()
    stored = interaction_repo.get(store, answer.id)
    assert stored is not None and stored.model_version == "v2" and stored.completion_tokens == answer.usage.completion_tokens
    assert stored.messages[-1].content == expected["v2"]


def test_streaming_and_langchain(gw: Running, local_model: LocalModel) -> None:
    client = gw.client()
    expected = local_model.generate([QUESTION], max_new_tokens=10, adapter="v2")[0].text
    chunks = list(
        client.chat.completions.create(
            model="champion", messages=QUESTION, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected and chunks[-1].usage is not None and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1
    model = ChatOpenAI(base_url=gw.base_url, api_key=gw.key, model="champion", max_tokens=10, max_retries=0, timeout=60)
    assert model.invoke(QUESTION[1]["content"]).content == local_model.generate([[QUESTION[1]]], max_new_tokens=10, adapter="v2")[0].text
    assert (
        "".join(str(c.content) for c in model.stream(QUESTION[1]["content"])).strip()
        == local_model.generate([[QUESTION[1]]], max_new_tokens=10, adapter="v2")[0].text
    )


def test_concurrent_requests_are_batched(gw: Running, local_model: LocalModel) -> None:
    from concurrent.futures import ThreadPoolExecutor

    questions = [[{"role": "user", "content": f"Where is my order number {i}?"}] for i in range(8)]
    client = gw.client()
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda q: client.chat.completions.create(model="v3", messages=q, max_tokens=6).choices[0].message.content, questions)
        )
    alone = [g.text for g in local_model.generate(questions, max_new_tokens=6, batch_size=1, adapter="v3")]
    assert answers == alone  # batching changes nothing in what each user gets
    assert gw.gateway.backend.describe()["largest_batch"] > 1


def test_unsupported_and_incompatible_requests(gw: Running, store: Store, tmp_path: Path, adapters: tuple[Path, Path]) -> None:
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        gw.client().chat.completions.create(model="champion", messages=QUESTION, n=2)
    other = registry.register_version(
        store, base_model=str(tmp_path / "another-base"), adapter_path=adapters[1], notes="same weights, other base"
    )
    assert other.id == "v3"  # registering the same adapter weights again returns the existing version
    with pytest.raises(UserInputError, match="runs on base model"):
        gw.gateway.backend.prepare(other.model_copy(update={"id": "v9", "base_model": str(tmp_path / "another-base")}))
