"""`atelier demo`: the whole product on Fashion-MNIST, in one command.

import the catalogue -> train the CGAN within a time budget (or take a checkpoint) -> index the
catalogue -> start the real gRPC server on a free localhost port -> GenerateAndRetrieve for
each class through the gRPC client -> a table, precision@5, an HTML report and the sample grid.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.catalog.fashion_mnist import CLASS_NAMES, import_fashion_mnist
from atelier.generator.train import TrainConfig, train
from atelier.indexer.runner import reindex
from atelier.retrieval.service import RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

TOP_K = 5
DEFAULT_INIT = Path(__file__).resolve().parents[1] / "checkpoints" / "cgan-fashion-mnist"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _index_is_current(index: Path, catalogue: Catalogue, input_size: int) -> bool:
    try:
        manifest = artifacts.read_manifest(artifacts.resolve(index), "index", verify=False)
    except artifacts.ArtifactError:
        return False
    return (manifest["catalogue"]["fingerprint"] == catalogue.fingerprint
            and manifest["embedder"]["input_size"] == input_size)


def run_demo(out: Path, train_seconds: float = 120.0, init: Path | None = None, from_scratch: bool = False,
             checkpoint: Path | None = None, source: Path | None = None, num_samples: int = 8, input_size: int = 64,
             seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    catalogue_dir = out / "catalogue"
    if (catalogue_dir / "manifest.json").exists():
        catalogue = Catalogue.open(catalogue_dir)
        _say(f"catalogue: reusing {catalogue_dir} ({len(catalogue)} products)")
    else:
        _say("catalogue: importing Fashion-MNIST (70,000 products, official train/test split)")
        catalogue = import_fashion_mnist(catalogue_dir, source)

    if checkpoint is not None:
        model_dir = Path(checkpoint)
        _say(f"model: using the trained checkpoint {model_dir}")
    else:
        model_dir = out / "model"
        if from_scratch:
            init = None
        elif init is None and DEFAULT_INIT.exists():
            init = DEFAULT_INIT
        elif init is not None and not Path(init).exists():
            raise FileNotFoundError(f"--init {init} does not exist")
        start = f"fine-tuning {init}" if init else "training the CGAN from scratch"
        _say(f"model: {start} on the train split for at most {train_seconds:.0f} s")
        train(TrainConfig(catalogue=catalogue_dir, out=model_dir, model="cgan", epochs=1000, init=init,
                          max_seconds=train_seconds, seed=seed, command=f"atelier demo --train-seconds {train_seconds}"
                          + (f" --init {init}" if init else " --from-scratch")))
    grid = out / "grid.png"
    shutil.copyfile(artifacts.resolve(model_dir) / "samples.png", grid)

    index_dir = out / "index"
    if _index_is_current(index_dir, catalogue, input_size):
        _say(f"index: reusing {index_dir}")
    else:
        _say(f"index: embedding {len(catalogue)} products with mobilenet_v2 at {input_size} px")
        reindex(catalogue_dir, index_dir, input_size=input_size)

    service = RetrievalService.open(index_dir, {"cgan": model_dir})
    server = start_server(service)
    _say(f"server: listening on {server.target}")
    rows = []
    try:
        with AtelierClient(server.target) as client:
            client.wait_ready()
            health = client.health()
            for i, name in enumerate(CLASS_NAMES):
                response = client.generate_and_retrieve({"category": name}, num_samples=num_samples, top_k=TOP_K,
                                                        seed=seed + i, return_images=True)
                rows.append({
                    "asked": name,
                    "products": [{"id": p.id, "score": round(p.score, 4), "category": p.attributes["category"].values[0]}
                                 for p in response.products],
                    "images": [im.png for im in response.images],
                    "timings_ms": {t.stage: round(t.milliseconds, 2) for t in response.timings},
                })
    finally:
        server.stop()

    hits = sum(p["category"] == r["asked"] for r in rows for p in r["products"])
    precision = hits / (len(rows) * TOP_K)
    print()
    print(format_table(rows))
    print(f"\nprecision@{TOP_K}: {precision:.3f}")
    results = {
        "precision_at_5": precision, "health": health, "num_samples": num_samples, "input_size": input_size,
        "model": str(model_dir), "model_training": artifacts.read_manifest(artifacts.resolve(model_dir), verify=False).get("training", {}),
        "seconds": round(time.perf_counter() - started, 1),
        "queries": [{k: v for k, v in r.items() if k != "images"} for r in rows],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out / "report.html", rows, catalogue, precision, grid)
    _say(f"report: {out / 'report.html'}; grid: {grid}; results: {out / 'results.json'} ({results['seconds']} s in all)")
    return results


def format_table(rows: list[dict]) -> str:
    width = max(len(r["asked"]) for r in rows)
    lines = [f"{'class asked':<{width}} | classes of the top-{TOP_K} products", f"{'-' * width}-+-{'-' * 60}"]
    for r in rows:
        cells = [p["category"] if p["category"] == r["asked"] else p["category"].upper() for p in r["products"]]
        lines.append(f"{r['asked']:<{width}} | " + ", ".join(cells))
    lines.append("(a class in CAPITALS differs from the one asked)")
    return "\n".join(lines)


def _img(png: bytes, title: str = "") -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" title="{html.escape(title)}">')


def write_report(path: Path, rows: list[dict], catalogue: Catalogue, precision: float, grid: Path) -> None:
    wanted = {p["id"] for r in rows for p in r["products"]}
    table = catalogue.read(["id", "image"])
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(wanted))))
    product_png = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    body = []
    for r in rows:
        generated = "".join(_img(png, "generated") for png in r["images"])
        found = "".join(
            f'<figure class="{"hit" if p["category"] == r["asked"] else "miss"}">{_img(product_png[p["id"]], p["id"])}'
            f'<figcaption>{html.escape(p["category"])}<br>{p["score"]:.3f}</figcaption></figure>'
            for p in r["products"]
        )
        body.append(f"<tr><th>{html.escape(r['asked'])}</th><td>{generated}</td><td>{found}</td></tr>")
    path.write_text(f"""<!doctype html><meta charset="utf-8"><title>atelier demo</title>
<style>body{{font-family:sans-serif}} img{{width:56px;image-rendering:pixelated;margin:1px}}
figure{{display:inline-block;margin:2px;text-align:center;font-size:11px}} .hit img{{outline:2px solid #2a2}}
.miss img{{outline:2px solid #c22}} td,th{{border-bottom:1px solid #ddd;padding:4px;text-align:left}}
#grid{{width:auto;image-rendering:pixelated;zoom:2}}</style>
<h1>atelier demo: Fashion-MNIST</h1>
<p>precision@{TOP_K}: <b>{precision:.3f}</b> (fraction of the top-{TOP_K} products whose class is the class asked)</p>
<table><tr><th>asked</th><th>generated images</th><th>top-{TOP_K} catalogue products (green: same class)</th></tr>
{''.join(body)}</table>
<h2>Sample grid (one column per class)</h2>{_img(grid.read_bytes(), "grid").replace("<img", '<img id="grid"')}
""")
