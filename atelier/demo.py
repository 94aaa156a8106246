"""`atelier demo`: the whole product in one command, on Fashion-MNIST or Fashion Product Images.

import the catalogue(s) -> train the generator within a time budget (fine-tuning the committed
checkpoint when there is one) or take a checkpoint as is (the committed one, for a dataset whose
default is a distilled flow) -> index the catalogue -> start the
real gRPC server on a free localhost port -> GenerateAndRetrieve for each query through the
gRPC client -> a table, attribute precision@k per group, the drawings' spread beside real
products', an HTML report and the sample grid.

Spread: the mean pairwise RMS distance between the grey pixels (in [0, 1]) of one query's
drawings, averaged over the queries, beside the same for as many real products with the asked
attributes (drawn from the training catalogue with the query's seed). A generator that draws
one image per class scores near 0; one as varied as the catalogue scores near the real value.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from atelier import artifacts
from atelier.catalog import Catalogue, run_import
from atelier.catalog.images import decode_image
from atelier.generator.train import TrainConfig, train
from atelier.indexer.embedders import Embedder, build_embedder, embedder_for_catalogue
from atelier.indexer.runner import reindex
from atelier.registry import Registry
from atelier.retrieval.precision import ALL, precision_at_k
from atelier.retrieval.service import RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

CHECKPOINTS = artifacts.COMMITTED_CHECKPOINTS


@dataclass(frozen=True)
class DemoDataset:
    model: str  # generator family
    checkpoint: str  # committed checkpoint folder name under checkpoints/
    top_k: int
    importer: str  # the name in atelier.catalog.IMPORTERS
    train_options: Mapping[str, Any]  # importer options of the training catalogue
    index_options: Mapping[str, Any] | None  # the catalogue to index; None: the training one
    queries: Callable[[Catalogue], list[dict[str, str]]]
    # False: serve the committed checkpoint as it is unless --init or --from-scratch says otherwise
    # (a distilled one-pass flow: fine-tuning it with the flow-matching loss would undo the distillation)
    fine_tune: bool = True


DEMO_DATASETS: Registry[DemoDataset] = Registry("demo dataset")


def _every_class(catalogue: Catalogue) -> list[dict[str, str]]:
    group = catalogue.schema.groups[0]
    return [{group.name: v} for v in group.values]


def _commonest_combinations(n: int, groups: tuple[str, ...] = ()) -> Callable[[Catalogue], list[dict[str, str]]]:
    """The n combinations of `groups` (default: all) with the most products (ties by name): real requests."""
    def run(catalogue: Catalogue) -> list[dict[str, str]]:
        names = list(groups or catalogue.schema.names)
        rows = catalogue.attributes().select(names).to_pylist()
        counts: dict[tuple, int] = {}
        for row in rows:
            key = tuple(row[g] for g in names)
            counts[key] = counts.get(key, 0) + 1
        best = sorted(counts, key=lambda k: (-counts[k], k))[:n]
        return [dict(zip(names, key)) for key in best]

    return run


# Fashion-MNIST: the flow distilled to one pass, whose drawings vary as real products do (the CGAN
# draws one image per class) at a GAN's serving cost; measured in the README's demo section
DEMO_DATASETS.add("fashion-mnist", DemoDataset("flow", "flow-distilled-fashion-mnist", 5, "fashion-mnist", {}, None,
                                               _every_class, fine_tune=False))
# Fashion Product Images, the whole catalogue (44,441 products, 7 groups): its flow distilled to one
# pass, asked for type and colour only (the other five groups drawn from what it learned), served as
# committed (no fine-tuning: minutes of CPU would not move a flow); it retrieves both asked values as
# often as its 40-pass teacher at a GAN's serving cost (README, the demo section)
DEMO_DATASETS.add("fashion-product-images", DemoDataset(
    "flow", "flow-distilled-fpi-full", 10, "fashion-product-images", {"selection": "full"}, None,
    _commonest_combinations(20, ("articleType", "baseColour")), fine_tune=False))
# The 6 apparel types x 6 colours: the MCGAN, trained on that selection, retrieving from every product
DEMO_DATASETS.add("fashion-product-images-apparel", DemoDataset(
    "mcgan", "mcgan-fpi-apparel", 10, "fashion-product-images", {"selection": "apparel-6x6"},
    {"selection": "apparel-6x6-all"}, _commonest_combinations(20)))


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _index_is_current(index: Path, catalogue: Catalogue, embedder: Embedder) -> bool:
    try:
        manifest = artifacts.read_manifest(artifacts.resolve(index), "index", verify=False)
    except artifacts.ArtifactError:
        return False
    return (manifest["catalogue"]["fingerprint"] == catalogue.fingerprint
            and manifest["embedder"]["weights_sha256"] == embedder.weights_sha256
            and manifest["embedder"]["input_size"] == embedder.input_size)


def _catalogue(folder: Path, spec: DemoDataset, options: Mapping[str, Any], source: Path | None,
               what: str) -> Catalogue:
    if (folder / "manifest.json").exists():
        catalogue = Catalogue.open(folder)
        _say(f"{what}: reusing {folder} ({len(catalogue)} products)")
        return catalogue
    _say(f"{what}: importing into {folder}")
    catalogue = run_import(spec.importer, source, folder, **options)
    _say(f"{what}: {len(catalogue)} products")
    return catalogue


def run_demo(out: Path, dataset: str = "fashion-mnist", train_seconds: float = 120.0, init: Path | None = None,
             from_scratch: bool = False, checkpoint: Path | None = None, source: Path | None = None,
             num_samples: int = 8, input_size: int = 64, seed: int = 0) -> dict:
    spec = DEMO_DATASETS.get(dataset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_dir = out / "catalogue"
    train_catalogue = _catalogue(train_dir, spec, spec.train_options, source, "catalogue")
    index_catalogue_dir, index_catalogue = train_dir, train_catalogue
    if spec.index_options is not None:
        index_catalogue_dir = out / "catalogue-index"
        index_catalogue = _catalogue(index_catalogue_dir, spec, spec.index_options, source, "index catalogue")
    model_dir = checkpoint
    if model_dir is None and not spec.fine_tune and init is None and not from_scratch:
        model_dir = CHECKPOINTS / spec.checkpoint
        _say(f"model: serving the committed {model_dir} as it is (this demo does not fine-tune it: "
             "--init or --from-scratch train)")
    elif model_dir is None:
        model_dir = _train_model(train_dir, out / "model", dataset, spec, train_seconds, init, from_scratch, seed)
    else:
        _say(f"model: serving the checkpoint {model_dir} as it is")
    grid = out / "grid.png"
    shutil.copyfile(artifacts.resolve(model_dir) / "samples.png", grid)
    embedder = _index(out / "index", index_catalogue_dir, index_catalogue, input_size)
    service = RetrievalService.open(out / "index", {spec.model: model_dir})
    rows, health = _ask(service, spec.queries(train_catalogue), num_samples, spec.top_k, seed)

    precision = attribute_precision(rows, spec.top_k)
    chance = random_precision(rows, service.index.products)
    spread = {"drawings": mean_spread([r["images"] for r in rows], train_catalogue.image_channels),
              "real_products": real_spread(train_catalogue, [r["asked"] for r in rows], num_samples, seed)}
    print()
    print(format_table(rows, spec.top_k))
    print()
    for group, value in precision.items():
        label = f"precision@{spec.top_k}" if len(precision) == 1 else f"precision@{spec.top_k} {group}"
        print(f"{label}: {value:.3f}  (random products: {chance[group]:.3f})")
    print(f"spread of the drawings: {spread['drawings']:.3f}  (real products: {spread['real_products']:.3f}, "
          f"ratio {spread['drawings'] / max(spread['real_products'], 1e-12):.2f})")
    results = {
        "dataset": dataset, "precision_at_k": precision, "random_precision_at_k": chance, "top_k": spec.top_k,
        "spread": spread,
        "health": health,
        "num_samples": num_samples, "embedder": embedder.describe(), "index_products": len(index_catalogue),
        "model": str(model_dir),
        "model_training": artifacts.read_manifest(artifacts.resolve(model_dir), verify=False).get("training", {}),
        "seconds": round(time.perf_counter() - started, 1),
        "queries": [{k: v for k, v in r.items() if k != "images"} for r in rows],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out / "report.html", rows, index_catalogue, precision, spec.top_k, grid, spread)
    _say(f"report: {out / 'report.html'}; grid: {grid}; results: {out / 'results.json'} ({results['seconds']} s in all)")
    return results


def _train_model(catalogue_dir: Path, model_dir: Path, dataset: str, spec: DemoDataset, train_seconds: float, init: Path | None,
                 from_scratch: bool, seed: int) -> Path:
    """Fine-tune the committed checkpoint (or --init, or random weights) within the time budget."""
    default_init = CHECKPOINTS / spec.checkpoint
    if from_scratch:
        init = None
    elif init is None and default_init.exists():
        init = default_init
    elif init is not None and not Path(init).exists():
        raise FileNotFoundError(f"--init {init} does not exist")
    start = f"fine-tuning {init}" if init else f"training the {spec.model} from scratch"
    _say(f"model: {start} on the train split for at most {train_seconds:.0f} s")
    train(TrainConfig(catalogue=catalogue_dir, out=model_dir, model=spec.model, epochs=1000,
                      init=init, max_seconds=train_seconds, seed=seed,
                      command=f"atelier demo --dataset {dataset} --train-seconds {train_seconds}"
                      + (f" --init {init}" if init else " --from-scratch")))
    return model_dir


def _index(index_dir: Path, catalogue_dir: Path, catalogue: Catalogue, input_size: int) -> Embedder:
    """Index the catalogue with the embedder measured best for it, unless the index there is current."""
    embedder_name = embedder_for_catalogue(catalogue.name)
    embedder = build_embedder(embedder_name, input_size)
    if _index_is_current(index_dir, catalogue, embedder):
        _say(f"index: reusing {index_dir}")
    else:
        what = "mobilenet_v2 (ImageNet)" if embedder.name == "mobilenet_v2" else f"the in-domain {embedder_name}"
        _say(f"index: embedding {len(catalogue)} products with {what} at {embedder.input_size} px")
        reindex(catalogue_dir, index_dir, embedder_name=embedder_name, input_size=input_size)
    return embedder


def _ask(service: RetrievalService, queries: list[dict[str, str]], num_samples: int, top_k: int,
         seed: int) -> tuple[list[dict], dict]:
    """Start the real gRPC server and send every query through the client: (rows, health)."""
    server = start_server(service)
    _say(f"server: listening on {server.target}")
    rows = []
    try:
        with AtelierClient(server.target) as client:
            client.wait_ready()
            health = client.health()
            for i, asked in enumerate(queries):
                response = client.generate_and_retrieve(asked, num_samples=num_samples, top_k=top_k,
                                                        seed=seed + i, return_images=True)
                rows.append({
                    "asked": asked,
                    "products": [{"id": p.id, "score": round(p.score, 4),
                                  **{g: "|".join(p.attributes[g].values) for g in asked}} for p in response.products],
                    "images": [im.png for im in response.images],
                    "timings_ms": {t.stage: round(t.milliseconds, 2) for t in response.timings},
                })
    finally:
        server.stop()
    return rows, health


def attribute_precision(rows: list[dict], top_k: int) -> dict[str, float]:
    """precision@top_k per asked group (atelier.retrieval.precision); with several groups also `all`."""
    groups = list(rows[0]["asked"])
    scores = precision_at_k([r["products"] for r in rows], [r["asked"] for r in rows], groups, [top_k])
    return {name: per_k[top_k] for name, per_k in scores.items() if name != ALL or len(groups) > 1}


def pairwise_rms(images: np.ndarray) -> float:
    """Mean RMS distance over all pairs of uint8 images (N, H, W, C), grey, in [0, 1]."""
    grey = images.astype(np.float64).mean(axis=3).reshape(len(images), -1) / 255.0
    pairs = [(i, j) for i in range(len(grey)) for j in range(i + 1, len(grey))]
    return float(np.mean([np.sqrt(np.mean((grey[i] - grey[j]) ** 2)) for i, j in pairs])) if pairs else 0.0


def mean_spread(pngs_per_query: list[list[bytes]], channels: int) -> float:
    """The drawings' spread: `pairwise_rms` per query, averaged over the queries."""
    return float(np.mean([pairwise_rms(np.stack([decode_image(png, channels) for png in pngs]))
                          for pngs in pngs_per_query]))


def real_spread(catalogue: Catalogue, queries: list[dict[str, str]], n: int, seed: int) -> float:
    """The same spread for n real products with each query's attributes (query i draws with seed + i)."""
    groups = list(queries[0])
    table = catalogue.read([*groups, "image"])
    values = {g: table.column(g).to_pylist() for g in groups}
    spreads = []
    for i, asked in enumerate(queries):
        rows = [r for r in range(table.num_rows) if all(values[g][r] == v for g, v in asked.items())]
        chosen = np.random.default_rng(seed + i).choice(rows, size=min(n, len(rows)), replace=False)
        images = np.stack([decode_image(table.column("image")[int(r)].as_py(), catalogue.image_channels)
                           for r in chosen])
        spreads.append(pairwise_rms(images))
    return float(np.mean(spreads))


def random_precision(rows: list[dict], products: pa.Table) -> dict[str, float]:
    """What attribute_precision expects from products drawn at random from the index: per query,
    the share of indexed products carrying the asked value(s), averaged over the queries."""
    groups = list(rows[0]["asked"])
    table = products.select(groups).to_pylist()
    result = {g: sum(sum(p[g] == r["asked"][g] for p in table) for r in rows) / (len(rows) * len(table)) for g in groups}
    if len(groups) > 1:
        result["all"] = sum(sum(all(p[g] == r["asked"][g] for g in groups) for p in table)
                            for r in rows) / (len(rows) * len(table))
    return result


def format_table(rows: list[dict], top_k: int) -> str:
    def cell(product: dict, asked: dict) -> str:
        return "/".join(product[g] if product[g] == v else product[g].upper() for g, v in asked.items())

    asked_labels = ["/".join(r["asked"].values()) for r in rows]
    header = "/".join(rows[0]["asked"])
    width = max(len(header) + len(" asked"), *(len(a) for a in asked_labels))
    lines = [f"{header + ' asked':<{width}} | {header} of the top-{top_k} products", f"{'-' * width}-+-{'-' * 60}"]
    for label, r in zip(asked_labels, rows):
        lines.append(f"{label:<{width}} | " + ", ".join(cell(p, r["asked"]) for p in r["products"]))
    lines.append("(a value in CAPITALS differs from the one asked)")
    return "\n".join(lines)


def _img(png: bytes, title: str = "") -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" title="{html.escape(title)}">'


def write_report(path: Path, rows: list[dict], catalogue: Catalogue, precision: dict[str, float], top_k: int,
                 grid: Path, spread: dict[str, float]) -> None:
    wanted = {p["id"] for r in rows for p in r["products"]}
    table = catalogue.read(["id", "image"])
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(wanted))))
    product_png = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    body = []
    for r in rows:
        asked = ", ".join(f"{g}={v}" for g, v in r["asked"].items())
        generated = "".join(_img(png, "generated") for png in r["images"])
        found = "".join(
            f'<figure class="{"hit" if all(p[g] == v for g, v in r["asked"].items()) else "miss"}">'
            f'{_img(product_png[p["id"]], p["id"])}<figcaption>'
            f'{html.escape("/".join(p[g] for g in r["asked"]))}<br>{p["score"]:.3f}</figcaption></figure>'
            for p in r["products"]
        )
        body.append(f"<tr><th>{html.escape(asked)}</th><td>{generated}</td><td>{found}</td></tr>")
    scores = ", ".join(f"{g} {v:.3f}" for g, v in precision.items())
    path.write_text(f"""<!doctype html><meta charset="utf-8"><title>atelier demo: {html.escape(catalogue.name)}</title>
<style>body{{font-family:sans-serif}} img{{width:56px;image-rendering:pixelated;margin:1px}}
figure{{display:inline-block;margin:2px;text-align:center;font-size:11px}} .hit img{{outline:2px solid #2a2}}
.miss img{{outline:2px solid #c22}} td,th{{border-bottom:1px solid #ddd;padding:4px;text-align:left}}
#grid{{width:auto;image-rendering:pixelated;zoom:2}}</style>
<h1>atelier demo: {html.escape(catalogue.name)}</h1>
<p>attribute precision@{top_k} (fraction of the top-{top_k} products whose value is the one asked): <b>{scores}</b></p>
<p>spread of the drawings (mean pairwise RMS pixel distance within a query): <b>{spread["drawings"]:.3f}</b>;
of as many real products with the asked attributes: <b>{spread["real_products"]:.3f}</b></p>
<table><tr><th>asked</th><th>generated images</th><th>top-{top_k} catalogue products (green: every value as asked)</th></tr>
{''.join(body)}</table>
<h2>Sample grid (one column per value of the first attribute)</h2>{_img(grid.read_bytes(), "grid").replace("<img", '<img id="grid"')}
""")

