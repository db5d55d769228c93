"""The tiny model builder and LocalModel: generation, scoring, embeddings, adapters, refusing pickles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from flywheel.demo.tiny_model import CHAT_TEMPLATE, EOS, build_tiny_model, tiny_corpus
from flywheel.errors import UserInputError
from flywheel.inference.folders import ADAPTER_WEIGHTS, check_adapter_folder
from flywheel.inference.local_model import Generation, LocalModel

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I want a refund"}]
CONV2 = [{"role": "user", "content": "Where is my order?"}]
CONV3 = [{"role": "user", "content": "Can you waive the fee for my account this month please?"}]


@pytest.fixture(scope="module")
def base(tiny_model_dir_h64: Path) -> Path:
    return tiny_model_dir_h64  # built once per session (tests/conftest.py)


@pytest.fixture(scope="module")
def model(base: Path) -> LocalModel:
    return LocalModel(base)


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with non-zero random weights (PEFT's default init leaves B at zero, a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, use_safetensors=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():  # large enough to move the logits of a tiny model visibly
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_build_is_deterministic_and_safetensors_only(base: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", tiny_corpus(), vocab_size=300, hidden=64)
    names = sorted(p.name for p in base.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    for name in names:
        assert hashlib.sha256((base / name).read_bytes()).digest() == hashlib.sha256((again / name).read_bytes()).digest(), name
    config = json.loads((base / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2


def test_chat_template_and_assistant_mask(model: LocalModel) -> None:
    tok = model.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == EOS and tok.pad_token and tok.bos_token
    prompt = model.render(CONV, add_generation_prompt=True)
    full = model.render([*CONV, {"role": "assistant", "content": "Refunds take five days."}], add_generation_prompt=False)
    assert full.startswith(prompt)  # TRL finds the completion where these diverge
    out = tok.apply_chat_template(
        [*CONV, {"role": "assistant", "content": "Refunds take five days."}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Refunds take five days." + EOS  # the answer and its stop token, nothing else


def test_generate_greedy_with_confidence(model: LocalModel) -> None:
    batch = model.generate([CONV, CONV2, CONV3], max_new_tokens=12, batch_size=3)
    alone = [model.generate([c], max_new_tokens=12)[0] for c in (CONV, CONV2, CONV3)]
    # left padding does not change the answer (a random tiny model mostly emits newlines, so compare numbers)
    for g_batch, g_alone in zip(batch, alone):
        assert (g_batch.text, g_batch.tokens) == (g_alone.text, g_alone.tokens)
        assert g_batch.mean_logprob == pytest.approx(g_alone.mean_logprob, abs=1e-4)
        assert g_batch.top1 == pytest.approx(g_alone.top1, abs=1e-5)
    for g in batch:
        assert isinstance(g, Generation)
        assert 1 <= g.tokens <= 12
        assert g.min_logprob <= g.mean_logprob <= 0
        assert len(g.top1) == len(g.top2) == len(g.entropy) == min(model.confidence_positions, g.tokens)
        assert all(0 <= b <= a <= 1 for a, b in zip(g.top1, g.top2))
        assert all(0 <= e <= np.log(len(model.tokenizer)) + 1e-4 for e in g.entropy)
        assert 0 <= g.least_confidence <= 1 and g.margin >= 0 and g.mean_entropy > 0
    # greedy: the chosen token is the most likely one, so the first logprob is log(top1)
    first = model.generate([CONV], max_new_tokens=1)[0]
    assert first.mean_logprob == pytest.approx(float(np.log(first.top1[0])), abs=1e-5)


def test_sequence_logprob_matches_unbatched_and_manual(model: LocalModel) -> None:
    import torch

    answers = ["Refunds take five business days.", "It ships Tuesday.", "No."]
    batched = model.sequence_logprob([CONV, CONV2, CONV3], answers, batch_size=3)
    single = [model.sequence_logprob([c], [a])[0] for c, a in zip([CONV, CONV2, CONV3], answers)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(v < 0 for v in batched)
    # by hand: log P(answer tokens + end-of-turn | prompt) from one forward pass
    tok = model.tokenizer
    prompt_ids = tok(model.render(CONV2, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    answer_ids = tok(answers[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.model(input_ids=ids).logits[0, :-1], dim=-1)
    manual = sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer_ids))
    assert batched[1] == pytest.approx(manual, abs=1e-4)


def test_embeddings_are_pooled_and_padding_invariant(model: LocalModel) -> None:
    together = model.embed_last_hidden([CONV, CONV2, CONV3], batch_size=3)
    apart = np.concatenate([model.embed_last_hidden([c]) for c in (CONV, CONV2, CONV3)])
    assert together.shape == (3, model.hidden_size) and together.dtype == np.float32
    assert np.allclose(together, apart, atol=1e-4)
    assert not np.allclose(together[0], together[1])
    assert model.embed_last_hidden([]).shape == (0, model.hidden_size)


def test_adapters_switch_by_name_without_reloading(base: Path, tmp_path: Path) -> None:
    a = _random_adapter(base, tmp_path / "a", seed=1)
    b = _random_adapter(base, tmp_path / "b", seed=2)
    answer = ["Refunds take five business days."]
    plain = LocalModel(base).sequence_logprob([CONV], answer)[0]
    served = LocalModel(base)
    served.load_adapter("a", a)
    served.load_adapter("b", b)
    base_module = served.model.get_base_model()
    assert served.active is None  # loading does not switch
    assert served.sequence_logprob([CONV], answer)[0] == pytest.approx(plain, abs=1e-5)
    served.set_adapter("a")
    with_a = served.sequence_logprob([CONV], answer)[0]
    with_b = served.sequence_logprob([CONV], answer, adapter="b")[0]  # one call on b, a stays active
    assert served.active == "a"
    assert abs(with_a - plain) > 1e-3 and abs(with_b - plain) > 1e-3 and abs(with_a - with_b) > 1e-3
    assert served.sequence_logprob([CONV], answer, adapter=None)[0] == pytest.approx(plain, abs=1e-5)
    assert LocalModel(base, adapter_path=a).sequence_logprob([CONV], answer)[0] == pytest.approx(with_a, abs=1e-5)
    assert served.model.get_base_model() is base_module  # the same base weights served all three
    served.set_adapter(None)
    assert served.generate([CONV], max_new_tokens=4)[0].text == LocalModel(base).generate([CONV], max_new_tokens=4)[0].text
    with pytest.raises(UserInputError, match="no adapter named 'c'"):
        served.set_adapter("c")
    # retiring adapters, down to none, leaves the plain base; loading again works
    served.set_adapter("b")
    served.remove_adapter("b")
    assert served.active is None and list(served.adapters) == ["a"]
    served.remove_adapter("a")
    assert served.adapters == {} and served.sequence_logprob([CONV], answer)[0] == pytest.approx(plain, abs=1e-5)
    served.load_adapter("a", a)
    assert served.sequence_logprob([CONV], answer, adapter="a")[0] == pytest.approx(with_a, abs=1e-5)


def test_adapter_loader_refuses_pickles_and_wrong_hashes(base: Path, tmp_path: Path) -> None:
    good = _random_adapter(base, tmp_path / "good", seed=3)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserInputError, match=r"adapter_model\.bin is refused"):
        LocalModel(base, adapter_path=pickled)
    with pytest.raises(UserInputError, match="sha256"):
        check_adapter_folder(good, expected_sha256="0" * 64)
    real = hashlib.sha256((good / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert check_adapter_folder(good, expected_sha256=real) == good
    with pytest.raises(UserInputError, match="no adapter_config.json"):
        check_adapter_folder(tmp_path)


def test_base_loader_refuses_pickled_weights(base: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled-base"
    folder.mkdir()
    (folder / "config.json").write_text((base / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserInputError, match="safetensors only"):
        LocalModel(folder)
