"""Take the README's screenshot of a merge run in the Prefect UI (run by hand, not in CI).

    apt-get install -y chromium        # Debian's headless-capable Chromium
    .venv/bin/python scripts/screenshot_merge_run.py docs/merge-run.png

Starts a Prefect server on a free port of 127.0.0.1 (its home in a temporary folder, the
UI told where its API is with ``PREFECT_UI_API_URL``), builds a tiny Llama family (a base
and two fine-tunes = base + small deltas), runs a dare_ties merge of it twice (the second
run reuses every unit), opens the first run's page (name, tags, graph with its
artifacts) and the page of its units table (an artifact) in headless Chromium, stacks the two
into one PNG, and stops the server.
"""

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(api_url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health",
                                                                 timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s")


def _family(root: Path) -> dict[str, str]:
    """A tiny Llama base (hidden 64, 4 layers, vocab 256) and two fine-tunes of it."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = root / "tiny-llama-base"
    LlamaForCausalLM(config).save_pretrained(base)
    tensors = load_file(base / "model.safetensors")
    models = {"base": str(base)}
    for i, name in enumerate(("tiny-llama-math", "tiny-llama-code")):
        folder = root / name
        shutil.copytree(base, folder)
        gen = torch.Generator().manual_seed(i + 1)
        save_file({k: v + 0.002 * torch.randn(v.shape, generator=gen)
                   for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        models[name] = str(folder)
    return models


def _units_artifact(merged: dict) -> str:
    """The id of the units table artifact a merge run published."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[merged["flow_run_id"]]),
            key=ArtifactFilterKey(any_=["dareflow-merge-tiny-llama-dare-ties-units"])))
    return str(artifact.id)


def _screenshot(url: str, png: Path, width: int, height: int) -> Path:
    """A page as headless Chromium renders it, after 20 s of (virtual) page time."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={width},{height}",
                    "--virtual-time-budget=20000", f"--screenshot={png}", url],
                   check=True, timeout=180, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return png


def _stack(parts: list[tuple[Path, int]], out: Path) -> None:
    """The top ``height`` pixels of each screenshot, one under the other, as one PNG
    (a 256-colour palette keeps the file small)."""
    from PIL import Image  # pillow: installed with matplotlib

    images = [Image.open(png).convert("RGB") for png, _ in parts]
    crops = [im.crop((0, 0, im.width, min(h, im.height))) for im, (_, h) in zip(images, parts)]
    sheet = Image.new("RGB", (max(c.width for c in crops), sum(c.height for c in crops)))
    y = 0
    for crop in crops:
        sheet.paste(crop, (0, y))
        y += crop.height
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", help="where the screenshot goes (e.g. docs/merge-run.png)")
    parser.add_argument("--width", type=int, default=1800, help="browser window width")
    parser.add_argument("--run-height", type=int, default=520,
                        help="pixels kept of the run page (its header and graph)")
    parser.add_argument("--units-height", type=int, default=600,
                        help="pixels kept of the units table's artifact page")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dareflow-screenshot-"))
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_API_URL=api_url,
               PREFECT_UI_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
         "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(api_url, server)
        os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
        from dareflow.flows.merge import run_merge  # after PREFECT_API_URL is set

        models = _family(work / "models")
        recipe = work / "tiny-llama-dare-ties.yaml"
        recipe.write_text(
            "name: tiny-llama-dare-ties\nmerge_method: dare_ties\n"
            f"base_model: {models['base']}\nmodels:\n"
            f"  - model: {models['tiny-llama-math']}\n    parameters: {{density: 0.5}}\n"
            f"  - model: {models['tiny-llama-code']}\n    parameters: {{density: 0.5}}\n"
            "seed: 0\n")
        store = str(work / "store")
        first = run_merge(str(recipe), str(work / "out" / "tiny-llama-dare-ties"),
                          store=store)
        run_merge(str(recipe), str(work / "out" / "again"), store=store)
        base = f"http://127.0.0.1:{port}"
        run_page = _screenshot(f"{base}/runs/flow-run/{first['flow_run_id']}",
                               work / "run.png", args.width, 1000)
        units = _screenshot(f"{base}/artifacts/artifact/{_units_artifact(first)}",
                            work / "units.png", args.width, 900)
        _stack([(run_page, args.run_height), (units, args.units_height)], Path(args.png))
        print(f"{base}/runs/flow-run/{first['flow_run_id']}\n-> {args.png}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
