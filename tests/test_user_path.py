"""The path a user walks by hand, as one test: README.md's "Using it on your own logs", command by command.

A support bot (a tiny model trained here to promise refunds it must not promise) is the base model. Its
logs go through ingest, triage, labelling, the judge, the knowledge-base corrector, a dataset, a LoRA
run, the evaluation against the champion, a canary and an approval; then `flywheel serve` answers the
official `openai` client with the new champion. Every command runs through the real CLI entry point in
a fresh project folder, on real SQLite, Chroma, training and HTTP, and each one's output must name the
step that comes next.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.cli import main

pytestmark = pytest.mark.slow

PROMISE = "We guarantee a full refund within 24 hours."  # what the bot learned; the default policy forbids it
APPROVED_REFUND = "Refunds reach your original card within 5 business days of approval."  # the knowledge base's answer
SYSTEM = "You are the support assistant."
ANSWERS = {
    "refund_status": PROMISE,
    "order_status": "Your order ships within 2 business days.",
    "opening_hours": "Support is open 9 to 5 on weekdays.",
}
PRODUCTS = ["jacket", "phone case", "lamp", "blender", "headset", "backpack", "kettle", "monitor", "printer", "tent", "camera", "scarf"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
TEMPLATES = {
    "refund_status": [
        "where is my refund for the {}",
        "I want my money back for the {}",
        "can I get a refund on the {}",
        "refund the {} please",
        "when will the {} refund arrive",
        "how long does a refund for the {} take",
    ],
    "order_status": [
        "where is my {}",
        "when does the {} ship",
        "has my {} shipped yet",
        "track the {} for me",
        "when will the {} arrive",
        "is the {} on its way",
    ],
    "opening_hours": [
        "are you open on {}",
        "what are your support hours on {}",
        "is support open on {}",
        "what time does support close on {}",
        "can I call support on {}",
        "when can I reach an agent on {}",
    ],
}
FILLS = {"refund_status": PRODUCTS, "order_status": PRODUCTS, "opening_hours": DAYS}


def questions(intent: str, logged: bool) -> list[str]:
    """The logs ask about the first two thirds of the products and days; the fixed test set about the rest."""
    fills = FILLS[intent]
    cut = len(fills) * 2 // 3
    return [t.format(f) for t in TEMPLATES[intent] for f in (fills[:cut] if logged else fills[cut:])]


def prompt(n: int, intent: str, question: str) -> list[dict]:
    """A conversation as production sees it, up to the answer: the system prompt, the user, and for orders
    and refunds the bot's order lookup and its result."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if intent != "opening_hours":
        call = {
            "id": f"call_{n}",
            "type": "function",
            "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": f"A-{1100 + n}"})},
        }
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps({"status": "delivered"})},
        ]
    return messages


def build_support_bot(folder: Path) -> Path:
    """The team's production model: a tiny causal LM trained from scratch (in full, as the team did) to
    answer each intent with one reply, the refund reply being a promise the policy forbids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.demo.tiny_model import build_tiny_model

    corpus = [q for intent in TEMPLATES for logged in (True, False) for q in questions(intent, logged)]
    corpus += [SYSTEM, json.dumps({"status": "delivered"}), *ANSWERS.values(), APPROVED_REFUND] * 3
    build_tiny_model(folder, corpus, vocab_size=500, hidden=64, layers=2, heads=4, max_len=256)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    examples = []
    for n, (intent, question) in enumerate((i, q) for i in TEMPLATES for q in questions(i, logged=True)):
        messages = prompt(n, intent, question)
        start = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        ids = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": ANSWERS[intent]}], tokenize=True, return_dict=True
        )["input_ids"]
        examples.append((ids, start))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(0)
    for _epoch in range(10):
        rng.shuffle(examples)
        for first in range(0, len(examples), 16):
            batch = examples[first : first + 16]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for row, (ids, start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, start : len(ids)] = torch.tensor(ids[start:])  # the loss is on the answer only
            model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_logs(path: Path) -> None:
    """Production logs: every refund answer breaks the policy and users react to many; order and hours
    answers are right, with the odd false alarm; personal data in the text; two broken lines."""
    reactions = [
        {"feedback": "down"},
        {"escalated_to_human": True},
        {"qa_verdict": "Reject"},
        {},
        {"complaint": "promised a refund that never came"},
        {"followups": 2},
        {"feedback": "down", "user_tier": "premium"},
        {},
    ]
    lines: list[str] = []
    n = 0
    for intent in TEMPLATES:
        for k, question in enumerate(questions(intent, logged=True)[::2]):
            n += 1
            if n == 1:
                question += ", my email is jane.doe@example.com and my phone is +1 415 555 0134"
            signals = reactions[k % len(reactions)] if intent == "refund_status" else {"feedback": "down"} if k % 7 == 3 else {}
            messages = [*prompt(n, intent, question), {"role": "assistant", "content": ANSWERS[intent]}]
            lines.append(
                json.dumps(
                    {
                        "id": f"conv-{n:03d}",
                        "timestamp": f"2026-11-02T09:{n // 60:02d}:{n % 60:02d}Z",
                        "model_version": "support-bot-v7",
                        "intent": intent,
                        "user_id": f"u-{n % 9}",
                        "messages": messages,
                        **signals,
                    }
                )
            )
    lines.insert(5, '{"id": "conv-broken", "messages": [')  # cut off mid-write
    lines.insert(9, json.dumps({"id": "conv-empty", "intent": "order_status"}))  # no messages
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_kb(path: Path) -> None:
    entries = [
        {
            "id": "refund-status",
            "kind": "approved_response",
            "intent": "refund_status",
            "title": "Where is my refund?",
            "text": APPROVED_REFUND,
        },
        {
            "kind": "policy",
            "intent": "refund_status",
            "title": "Refund policy",
            "text": "Never promise a refund before the return is inspected.",
        },
        {"id": "order-status", "kind": "approved_response", "intent": "order_status", "title": "Shipping", "text": ANSWERS["order_status"]},
        {"text": "Support is open 9 to 5 on weekdays."},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def write_test_set(path: Path) -> None:
    """The fixed test set: traffic of the same shape as the logs, about products and days they never name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"t{n}", "messages": prompt(900 + n, intent, q), "reference": {"intent": intent}}
        for n, (intent, q) in enumerate((i, q) for i in TEMPLATES for q in questions(i, logged=False))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


README_BASE = "/models/my-bot"  # the README's base model folder; the test's own stands in for it


def readme_commands() -> list[str]:
    """The commands of README.md's "Using it on your own logs" block, without their comments."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using it on your own logs", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def test_the_readme_path_from_logs_to_a_served_champion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    # One thread for torch here and in the training worker and the gateway: a tiny model gains nothing from
    # a second one, and on a busy 2-core machine two threads make a training step several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = build_support_bot(tmp_path / "models" / "support-bot")
        ran = walk(tmp_path / "bot", base, capsys, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    # The README shows exactly this path, command for command.
    assert [line.replace(str(base), README_BASE) for line in ran] == readme_commands()


def walk(project: Path, base: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every step of the README's block in a fresh project folder; returns the commands as typed."""
    project.mkdir()
    monkeypatch.chdir(project)  # the commands run as a person types them, in the project folder
    monkeypatch.setenv("COLUMNS", "200")
    ran: list[str] = []

    def step(*args: str, next_step: str, code: int = 0) -> str:
        """Run `flywheel ARGS`; check its exit status and that what it prints names the next step."""
        ran.append(shlex.join(["flywheel", *args]))
        capsys.readouterr()
        got = main(list(args))
        out, err = capsys.readouterr()
        said = out + err
        assert got == code, f"{ran[-1]} exited {got}, expected {code}\n{said}"
        assert next_step in said, f"{ran[-1]} does not name the next step {next_step!r}:\n{said}"
        return said

    out = step("init", "--base", str(base), next_step="flywheel ingest")
    assert "as v1, the champion" in out
    # What a person edits in the flywheel.toml that init wrote: the fixed test set the gate needs, and (for
    # a tiny model) a short training run.
    config = project / "flywheel.toml"
    text = config.read_text(encoding="utf-8")
    assert '# test_set = "eval/test_set.jsonl"' in text and "[train]\n" in text
    text = text.replace('# test_set = "eval/test_set.jsonl"', 'test_set = "eval/test_set.jsonl"', 1)
    text = text.replace("[train]\n", "[train]\nepochs = 4.0\nmin_steps = 0\nbatch_size = 8\nlearning_rate = 1e-2\n", 1)
    config.write_text(text, encoding="utf-8")
    write_test_set(project / "eval" / "test_set.jsonl")
    write_logs(project / "logs.jsonl")
    write_kb(project / "kb.jsonl")

    out = step("ingest", "logs.jsonl", next_step="flywheel triage", code=2)  # 2: some lines were quarantined
    assert "read 62, stored 60, duplicates 0, quarantined 2" in out
    for stored in (project / ".flywheel").glob("flywheel.db*"):
        assert b"jane.doe@example.com" not in stored.read_bytes() and b"555 0134" not in stored.read_bytes()  # scrubbed

    step("kb", "add", "kb.jsonl", next_step="flywheel triage")
    out = step("triage", next_step="flywheel select")
    assert re.search(r"captured [1-9]\d* failures", out), out

    out = step("select", "--budget", "4", next_step="flywheel label")
    picked = re.findall(r"(f-[0-9a-f]{12})\W+(\w+)", out)
    assert len(picked) == 4, out
    # The person reads each picked conversation: a refund promise is wrong (the intent is right and the
    # knowledge base has the answer); the order and opening-hours answers were right as logged.
    labels = [
        {"failure_id": fid, "intent": "refund_status"} if intent == "refund_status" else {"failure_id": fid, "fine": True}
        for fid, intent in picked
    ]
    (project / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels), encoding="utf-8")
    out = step("label", "--file", "labels.jsonl", next_step="flywheel judge")
    assert "stored 4 of 4 label(s)" in out

    out = step("judge", next_step="flywheel correct")
    assert "over_promise" in out
    out = step("correct", next_step="flywheel dataset build")
    assert re.search(r"verified\s*│\s*[1-9]", out), out
    step("dataset", "build", next_step="flywheel train --dataset latest")
    out = step("train", "--dataset", "latest", next_step="flywheel eval --candidate v2")
    assert "registered v2 (candidate)" in out

    out = step("eval", "--candidate", "v2", next_step="flywheel canary start v2")
    assert "gate PASSED" in out
    # the promise the bot learned is gone from the fixed test set, whose questions the loop never saw
    assert re.search(r"targeted over_promise on the fixed test set: [1-9][\d.]*% \(\d+/60\) -> 0\.0% \(0/60\)", out), out

    step("canary", "start", "v2", next_step="flywheel canary status")
    out = step("canary", "status", next_step="flywheel approve v2")
    assert "canary v2" in out
    out = step("approve", "v2", next_step="flywheel keys create")
    assert "promoted v2 to champion; previous is v1" in out

    ran.append("flywheel keys create support-bot")
    capsys.readouterr()
    assert main(["keys", "create", "support-bot"]) == 0
    key, err = capsys.readouterr()
    key = key.strip()
    assert key.startswith("fw-") and "next: flywheel serve" in err  # stdout is the key alone, for scripts

    ran.append("flywheel serve")
    serve_and_ask(project, key)
    return ran


def serve_and_ask(project: Path, key: str) -> None:
    """`flywheel serve` in its own process (on a free port, through the settings' environment variables):
    the official openai client asks for the champion and v2 answers, with the approved reply."""
    import openai

    port = _free_port()
    env = {**os.environ, "FLYWHEEL_SERVE__PORT": str(port)}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "serve"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert gateway.poll() is None, gateway.communicate()[1]
                assert time.monotonic() < deadline, "flywheel serve did not start listening"
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        question = questions("refund_status", logged=True)[1]
        completion = client.chat.completions.create(
            model="champion", messages=prompt(1, "refund_status", question), user="u-1931", max_tokens=64
        )
        answer = completion.choices[0].message.content or ""
        assert completion.model == "v2"
        assert answer.startswith(APPROVED_REFUND) and "guarantee" not in answer, answer
    finally:
        gateway.terminate()  # SIGTERM: the gateway writes what it captured before it exits
        _, err = gateway.communicate(timeout=60)
    assert f"flywheel gateway (builtin) on http://127.0.0.1:{port}/v1" in err
    db = sqlite3.connect(project / ".flywheel" / "flywheel.db")
    try:
        captured = db.execute("select model_version, source from interactions where id = ?", (completion.id,)).fetchall()
    finally:
        db.close()
    assert captured == [("v2", "gateway:support-bot")]  # the answer is stored for the next cycle
