"""Evaluation with onnxruntime: :func:`evaluate` (top-1/top-5 on a labelled image folder) and :func:`compare`
(dense vs sparse on the same inputs). Labelled folders have torchvision's ImageFolder layout: one sub-folder
per class, class index = sorted folder order or the line number in a ``--labels`` file.

Images take the path ``prune``'s calibration images take: the same folder scan, :func:`resolve_preprocess`,
:class:`DecoderPool` and ``ResolvedPreprocess.to_input``, streamed in batches so that folders larger than
memory work.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxsparse.data.calibration import scan_calibration_folder
from onnxsparse.data.calibration_set import feed_batches
from onnxsparse.data.images import DecoderPool, is_image_file
from onnxsparse.data.preprocess_options import PreprocessConfig
from onnxsparse.data.preprocess_resolution import ResolvedPreprocess, resolve_preprocess
from onnxsparse.data.spec import InputSpec, input_specs
from onnxsparse.data.tensors import collect_files, is_tensor_file
from onnxsparse import metrics
from onnxsparse.errors import OnnxSparseError
from onnxsparse.exporter.verify import ort_device, ort_session
from onnxsparse.importer.load import load_model
from onnxsparse.inspect import inspect_model
from onnxsparse.signals import onnx_output_kinds

logger = logging.getLogger(__name__)

UNLABELLED = -1


# ---------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class ImageFolder:
    """Image files of a folder and, for an ImageFolder layout, their class index (else ``UNLABELLED``)."""

    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]  # class names by index; () when unlabelled

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def head(self, limit: int | None) -> ImageFolder:
        """The first ``limit`` files, taken evenly across classes (round robin) so that a subset stays balanced."""
        if limit is None or limit >= len(self.files):
            return self
        if not self.labelled:
            return ImageFolder(self.files[:limit], self.labels[:limit], self.classes)
        # Round robin: each class's first file, then each class's second, ...; kept in file order.
        seen: Counter = Counter()
        rank = []
        for label in self.labels:
            rank.append(seen[label])
            seen[label] += 1
        picked = sorted(sorted(range(len(self.files)), key=lambda i: (rank[i], self.labels[i]))[:limit])
        return ImageFolder(tuple(self.files[i] for i in picked), tuple(self.labels[i] for i in picked), self.classes)


def read_labels_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names, one per line, in class-index order (blank lines and ``#`` comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise OnnxSparseError(f"--labels file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxSparseError(f"cannot read --labels file {p}: {exc}") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise OnnxSparseError(f"--labels file {p} lists no class names (expected one name per line)")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise OnnxSparseError(f"--labels file {p} lists {', '.join(map(repr, dupes[:5]))} more than once")
    return tuple(names)


def _images_under(folder: Path) -> tuple[Path, ...]:
    """The image files under ``folder``, found and ordered as ``prune --calib`` finds them."""
    return scan_calibration_folder(folder).images if any(folder.iterdir()) else ()


def scan_folder(root: str | os.PathLike, *, labels_file: str | os.PathLike | None = None,
                require_labels: bool = True) -> ImageFolder:
    """Scan ``root``. ImageFolder layout (images only inside class sub-folders) gives labels.

    ``require_labels=False`` also accepts a flat or mixed folder (every image, recursively, unlabelled).
    """
    path = Path(root)
    if not path.is_dir():
        raise OnnxSparseError(f"--data {path} is not a folder")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in path.iterdir() if p.is_file() and is_image_file(p.name)]
    if not subdirs or loose:
        if require_labels:
            raise OnnxSparseError(
                f"--data {path} is not a labelled image folder: expected one sub-folder per class holding its "
                f"images (torchvision ImageFolder layout), found {len(subdirs)} sub-folder(s) and "
                f"{len(loose)} image(s) at the top"
            )
        files = _images_under(path)
        if not files:
            raise OnnxSparseError(f"--data {path} holds no image files")
        return ImageFolder(tuple(files), (UNLABELLED,) * len(files), ())
    if labels_file is not None:
        classes = read_labels_file(labels_file)
        unknown = [d.name for d in subdirs if d.name not in classes]
        if unknown:
            raise OnnxSparseError(
                f"class folder(s) {', '.join(map(repr, unknown[:5]))} in {path} are not in --labels {labels_file} "
                f"(which lists {len(classes)} classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
            )
    else:
        classes = tuple(d.name for d in subdirs)
    index = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for d in subdirs:
        found = _images_under(d)
        files.extend(found)
        labels.extend([index[d.name]] * len(found))
    if not files:
        raise OnnxSparseError(f"--data {path}: the class folders hold no image files")
    return ImageFolder(tuple(files), tuple(labels), classes)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class Pipeline:
    """The resolved preprocessing for the model's one image input."""

    resolved: ResolvedPreprocess
    spec: InputSpec

    def batch(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded (H, W[, C]) pixel arrays -> one feed in the model's layout and dtype."""
        inputs = np.empty((len(images), *self.resolved.sample_shape), np.float32)
        for i, pixels in enumerate(images):
            self.resolved.to_input(pixels, out=inputs[i])
        return {self.spec.name: inputs.astype(self.spec.dtype, copy=False)}


def image_pipeline(model: onnx.ModelProto, model_path: str | os.PathLike | None,
                   preprocess: PreprocessConfig) -> Pipeline:
    specs = input_specs(model)
    if len(specs) != 1:
        raise OnnxSparseError(
            f"evaluation on an image folder needs a model with one input, got {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    return Pipeline(resolve_preprocess(preprocess, specs[0], model=model, model_path=model_path), specs[0])


def iter_batches(folder: ImageFolder, pipeline: Pipeline, batch_size: int, *, workers: int = 2,
                 skipped: Counter | None = None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feed, labels) batches in file order; unreadable files are counted in ``skipped`` and left out."""
    if batch_size < 1:
        raise OnnxSparseError(f"--batch-size must be >= 1, got {batch_size}")
    skipped = skipped if skipped is not None else Counter()
    images: list[np.ndarray] = []
    labels: list[int] = []
    with DecoderPool(pipeline.resolved.plan(), workers) as pool:
        for path, label, decoded in zip(folder.files, folder.labels, pool.decode([str(p) for p in folder.files])):
            if decoded.array is None:
                skipped[decoded.reason] += 1
                logger.warning("skipping %s: %s", path, decoded.message)
                continue
            images.append(decoded.array)
            labels.append(label)
            if len(images) == batch_size:
                yield pipeline.batch(images), np.asarray(labels, np.int64)
                images, labels = [], []
    if images:
        yield pipeline.batch(images), np.asarray(labels, np.int64)


@dataclass(frozen=True)
class ImageData:
    """A whole (small) folder decoded and preprocessed into memory: for evaluating many models."""

    inputs: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    preprocess: dict
    skipped: dict

    def __len__(self) -> int:
        return len(self.labels)


def load_images(model: str | os.PathLike | onnx.ModelProto, data: str | os.PathLike, *,
                preprocess: PreprocessConfig | None = None, labels_file: str | os.PathLike | None = None,
                limit: int | None = None, require_labels: bool = True, workers: int | None = None) -> ImageData:
    """Decode ``data`` for ``model`` into memory (see :func:`iter_batches` for the streaming form)."""
    preprocess = preprocess or PreprocessConfig(augment=False)
    proto, model_path = _proto(model)
    folder = scan_folder(data, labels_file=labels_file, require_labels=require_labels).head(limit)
    pipeline = image_pipeline(proto, model_path, preprocess)
    skipped: Counter = Counter()
    xs, ys = [], []
    for feed, y in iter_batches(folder, pipeline, 256, workers=preprocess.workers if workers is None else workers,
                                skipped=skipped):
        xs.append(feed[pipeline.spec.name])
        ys.append(y)
    if not xs:
        raise OnnxSparseError(f"none of the {len(folder.files)} image files in {data} could be decoded")
    return ImageData(np.concatenate(xs), np.concatenate(ys), folder.classes, pipeline.resolved.as_dict(),
                     dict(skipped))


def _proto(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if not Path(model).is_file():
        raise OnnxSparseError(f"model {model} does not exist")
    return load_model(model), str(model)


# ---------------------------------------------------------------------------------------------
# Running a session


class _Runner:
    """Runs one onnxruntime session on feeds of any batch size, padding where the batch dimension is fixed."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = session.get_inputs()
        dim = inputs[0].shape[0] if inputs and inputs[0].shape else None
        self.fixed = dim if isinstance(dim, int) and dim > 0 else None
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        names = names or self.output_names
        if self.fixed is None:
            return [np.asarray(o) for o in self.session.run(names, feed)]
        n = len(next(iter(feed.values())))
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, n, self.fixed):
            chunk = {name: x[i:i + self.fixed] for name, x in feed.items()}
            size = min(self.fixed, n - i)
            if size < self.fixed:
                chunk = {name: np.concatenate([x, np.repeat(x[-1:], self.fixed - size, axis=0)])
                         for name, x in chunk.items()}
            for j, out in enumerate(self.session.run(names, chunk)):
                parts[j].append(np.asarray(out)[:size])
        return [np.concatenate(p) for p in parts]


def _scores(out: np.ndarray, n: int) -> np.ndarray:
    if out.ndim == 0 or out.shape[0] != n:
        raise OnnxSparseError(
            f"the model's first output has shape {list(out.shape)}; evaluation needs class scores with the "
            f"batch first ([N, classes])"
        )
    return out.reshape(n, -1)


@dataclass
class Accuracy:
    images: int = 0
    top1: int = 0
    top5: int = 0
    classes: int = 0  # scores per sample the model outputs

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        if labels.size and labels.max() >= scores.shape[1]:
            raise OnnxSparseError(
                f"class index {int(labels.max())} is out of range: the model outputs {scores.shape[1]} scores; "
                "check --labels (one class per line, in the model's class order)"
            )
        self.classes = scores.shape[1]
        k = min(5, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.argsort(-scores, 1)
        self.images += len(labels)
        self.top1 += int((scores.argmax(1) == labels).sum())
        self.top5 += int((top == labels[:, None]).any(1).sum())

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "correct_top1": self.top1,
            "top1": self.top1 / self.images if self.images else None,
            # With 5 classes or fewer top-5 is always 1: reported as None.
            "top5": self.top5 / self.images if self.images and self.classes > 5 else None,
        }


def accuracy_of(session: ort.InferenceSession, inputs: np.ndarray, labels: np.ndarray,
                batch_size: int = 256) -> dict:
    """Top-1/top-5 of ``session`` on in-memory preprocessed ``inputs``."""
    runner = _Runner(session)
    names = [i.name for i in session.get_inputs()]
    if len(names) != 1:
        raise OnnxSparseError(f"accuracy_of needs a model with one input, got {len(names)} ({', '.join(names)})")
    name = names[0]
    acc = Accuracy()
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size]
        acc.add(_scores(runner.run({name: x}, runner.output_names[:1])[0], len(x)), labels[i:i + batch_size])
    return acc.as_dict()


# ---------------------------------------------------------------------------------------------
# Public entry points


@dataclass(frozen=True)
class EvalResult:
    model: str
    data: str
    images: int
    classes: int
    top1: float
    top5: float | None
    correct_top1: int
    seconds: float
    skipped: dict
    preprocess: dict

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(model: str | os.PathLike, data: str | os.PathLike, *, preprocess: PreprocessConfig | None = None,
             labels_file: str | os.PathLike | None = None, batch_size: int = 64, limit: int | None = None,
             progress: bool = False, device: str | None = None) -> EvalResult:
    """Top-1 and top-5 accuracy of ``model`` with onnxruntime on the labelled folder ``data``.

    ``device``: "cpu" (default), "cuda[:N]" (onnxruntime's CUDA provider, CPU when it is missing) or "auto"."""
    from tqdm import tqdm

    preprocess = preprocess or PreprocessConfig(augment=False)
    start = time.perf_counter()
    proto, model_path = _proto(model)
    folder = scan_folder(data, labels_file=labels_file).head(limit)
    pipeline = image_pipeline(proto, model_path, preprocess)
    runner = _Runner(ort_session(model, ort_device(device)))
    acc = Accuracy()
    skipped: Counter = Counter()
    with tqdm(total=len(folder.files), desc="evaluating", unit="img", disable=None if progress else True) as bar:
        for feed, y in iter_batches(folder, pipeline, batch_size, workers=preprocess.workers, skipped=skipped):
            acc.add(_scores(runner.run(feed, runner.output_names[:1])[0], len(y)), y)
            bar.update(len(y))
    if acc.images == 0:
        raise OnnxSparseError(f"none of the {len(folder.files)} image files in {data} could be decoded")
    if acc.classes != len(folder.classes):
        logger.info("the model outputs %d scores; the data has %d classes", acc.classes, len(folder.classes))
    d = acc.as_dict()
    return EvalResult(str(model), str(data), acc.images, len(folder.classes), d["top1"], d["top5"],
                      d["correct_top1"], round(time.perf_counter() - start, 3),
                      {k: v for k, v in skipped.items() if v}, pipeline.resolved.as_dict())


class _OutputStats:
    """Streaming cosine similarity (over all elements) and absolute differences of one output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dot = self.na = self.nb = self.abs_sum = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.equal = True

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, np.float64).reshape(-1)
        b = np.asarray(b, np.float64).reshape(-1)
        if a.shape != b.shape:
            raise OnnxSparseError(f"output {self.name!r} has {a.size} values in one model and {b.size} in the other")
        self.dot += float(a @ b)
        self.na += float(a @ a)
        self.nb += float(b @ b)
        diff = np.abs(a - b)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        self.equal = self.equal and bool(np.array_equal(a, b))

    def as_dict(self) -> dict:
        denom = (self.na * self.nb) ** 0.5
        cosine = self.dot / denom if denom > 0 else float(self.equal)
        return {"name": self.name, "cosine": cosine, "max_abs_diff": self.max_abs,
                "mean_abs_diff": self.abs_sum / self.count if self.count else 0.0}


def _is_scores(out: np.ndarray, n: int) -> bool:
    """Class scores: float, batch first, one axis of more than one value after dropping trailing 1s."""
    shape = list(out.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return (len(shape) == 2 and shape[0] == n and shape[1] > 1 and np.issubdtype(out.dtype, np.floating))


@dataclass(frozen=True)
class LayerPair:
    tensor: str
    node: str
    op: str
    params: int
    dense_sparsity: float | None
    sparse_sparsity: float | None


@dataclass(frozen=True)
class CompareResult:
    dense: str
    sparse: str
    data: str
    images: int
    top1_agreement: float | None  # of the first class output, where there is one
    agreement: float | None  # the lowest per-output agreement (onnxsparse.metrics), what --min-agreement reads
    outputs: list[dict]
    layers: list[LayerPair]
    dense_sparsity: float
    sparse_sparsity: float
    dense_accuracy: dict | None
    sparse_accuracy: dict | None
    seconds: float

    def passes(self, min_agreement: float | None) -> bool:
        if min_agreement is None:
            return True
        return self.agreement is not None and self.agreement >= min_agreement

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d


def _sparsity_pairs(dense: onnx.ModelProto, sparse: onnx.ModelProto) -> tuple[list[LayerPair], float, float]:
    a = {r.tensor: r for r in inspect_model(dense)}
    # a weight the sparse model stores under another name (int8 behind DequantizeLinear) pairs by its node
    by_node = {r.node: r.tensor for r in a.values() if r.node}
    b = {(r.tensor if r.tensor in a or r.node not in by_node else by_node[r.node]): r for r in inspect_model(sparse)}
    pairs = []
    for name in list(a) + [n for n in b if n not in a]:
        ra, rb = a.get(name), b.get(name)
        ref = ra or rb
        pairs.append(LayerPair(name, ref.node, ref.op, ref.params, ra.sparsity if ra else None,
                               rb.sparsity if rb else None))

    def total(rows):
        params = sum(r.params for r in rows.values())
        return sum(r.zeros for r in rows.values()) / params if params else 0.0

    return pairs, total(a), total(b)


def _compare_inputs(data: str | os.PathLike, model: onnx.ModelProto, model_path: str | None,
                    preprocess: PreprocessConfig, labels_file: str | os.PathLike | None, batch_size: int,
                    limit: int | None) -> tuple[Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]], bool, int]:
    """(batches, labelled, files) from ``data``: any path ``prune --calib`` takes (image folder, folder of
    .npy/.npz tensors, one .npy/.npz file); image folders in an ImageFolder layout also give labels."""
    path = Path(data)
    tensors = _tensor_files(path)
    if tensors:
        if labels_file is not None:
            raise OnnxSparseError(f"--labels needs a labelled image folder, but --data {path} holds .npy/.npz tensors")
        if batch_size < 1:
            raise OnnxSparseError(f"--batch-size must be >= 1, got {batch_size}")
        specs = input_specs(model)
        arrays = {name: a[:limit] for name, a in collect_files(tensors, specs, path).arrays().items()}
        feeds = feed_batches(arrays, {s.name: s.dtype for s in specs}, batch_size)
        return ((feed, None) for feed in feeds), False, len(tensors)
    folder = scan_folder(path, labels_file=labels_file, require_labels=labels_file is not None).head(limit)
    pipeline = image_pipeline(model, model_path, preprocess)
    return iter_batches(folder, pipeline, batch_size, workers=preprocess.workers), folder.labelled, len(folder.files)


def _tensor_files(path: Path) -> list[Path]:
    """The .npy/.npz files that ``path`` is or holds, found as ``prune --calib`` finds them; [] otherwise."""
    if path.is_file():
        return [path] if is_tensor_file(path.name) else []
    if not path.is_dir():
        return []
    if not any(path.iterdir()):
        return []
    folder = scan_calibration_folder(path)
    folder.check_one_kind("--data", "--data")
    return list(folder.tensors)


class _Comparison:
    """Streaming comparison of two models' outputs on the same batches; per output, the agreement of
    :mod:`onnxsparse.metrics` by the kind the quality gate reads (:func:`onnx_output_kinds` of the dense model)."""

    def __init__(self, model: onnx.ModelProto, output_names: list[str], labelled: bool) -> None:
        self.model = model
        self.stats = [_OutputStats(name) for name in output_names]
        self.counts: list[metrics.AgreementCount] = []
        self.labelled = labelled
        self.dense_accuracy, self.sparse_accuracy = Accuracy(), Accuracy()
        self.agree = self.samples = 0
        self.all_scores = True

    def add(self, outs_d: list[np.ndarray], outs_s: list[np.ndarray], labels: np.ndarray | None, n: int) -> None:
        self.samples += n
        if not self.counts:
            self.counts = [metrics.AgreementCount(kind, axis, metrics.PROBABILITY_THRESHOLD)
                           for kind, axis in onnx_output_kinds(self.model, outs_d)]
        for st, count, a, b in zip(self.stats, self.counts, outs_d, outs_s):
            st.add(a, b)
            count.add(np.asarray(a), np.asarray(b))
        a0, b0 = outs_d[0], outs_s[0]
        self.all_scores = self.all_scores and _is_scores(a0, n)
        if self.all_scores:
            self.agree += int((_scores(a0, n).argmax(1) == _scores(b0, n).argmax(1)).sum())
        if self.labelled and self.all_scores and labels is not None:
            try:
                self.dense_accuracy.add(_scores(a0, n), labels)
                self.sparse_accuracy.add(_scores(b0, n), labels)
            except OnnxSparseError as exc:
                logger.info("no accuracy: %s", exc)
                self.labelled = False
        self.labelled = self.labelled and self.all_scores

    def top1(self) -> float | None:
        return self.agree / self.samples if self.all_scores else None

    def agreement(self) -> float | None:
        values = [c.value for c in self.counts if c.value is not None]
        return min(values) if values else None

    def outputs(self) -> list[dict]:
        return [{**st.as_dict(), "kind": count.kind, "agreement": count.value, "measure": count.measure}
                for st, count in zip(self.stats, self.counts)]

    def accuracies(self) -> tuple[dict | None, dict | None]:
        if not self.labelled:
            return None, None
        return self.dense_accuracy.as_dict(), self.sparse_accuracy.as_dict()


def compare(dense: str | os.PathLike, sparse: str | os.PathLike, data: str | os.PathLike, *,
            preprocess: PreprocessConfig | None = None, labels_file: str | os.PathLike | None = None,
            batch_size: int = 64, limit: int | None = None, device: str | None = None) -> CompareResult:
    """Run ``dense`` and ``sparse`` on the same inputs from ``data`` and compare their outputs.

    ``data`` is an image folder (labelled folders also give both accuracies) or the tensors ``prune --calib``
    takes: a folder of .npy/.npz files or one such file. ``device`` as in :func:`evaluate`.
    """
    preprocess = preprocess or PreprocessConfig(augment=False)
    start = time.perf_counter()
    dense_proto, dense_path = _proto(dense)
    sparse_proto, _ = _proto(sparse)
    dense_sess, sparse_sess = ort_session(dense, ort_device(device)), ort_session(sparse, ort_device(device))
    for what, fa, fb in (("inputs", dense_sess.get_inputs(), sparse_sess.get_inputs()),
                         ("outputs", dense_sess.get_outputs(), sparse_sess.get_outputs())):
        na, nb = [x.name for x in fa], [x.name for x in fb]
        if na != nb:
            raise OnnxSparseError(f"the two models have different {what}: {na} vs {nb}; compare needs the same graph")
    batches, labelled, files = _compare_inputs(data, dense_proto, dense_path, preprocess, labels_file, batch_size,
                                               limit)
    dense_run, sparse_run = _Runner(dense_sess), _Runner(sparse_sess)
    comparison = _Comparison(dense_proto, dense_run.output_names, labelled)
    for feed, y in batches:
        comparison.add(dense_run.run(feed), sparse_run.run(feed), y, len(next(iter(feed.values()))))
    if comparison.samples == 0:
        raise OnnxSparseError(f"none of the {files} image files in {data} could be decoded")
    pairs, dense_total, sparse_total = _sparsity_pairs(dense_proto, sparse_proto)
    dense_accuracy, sparse_accuracy = comparison.accuracies()
    return CompareResult(
        str(dense), str(sparse), str(data), comparison.samples, comparison.top1(), comparison.agreement(),
        comparison.outputs(), pairs, dense_total, sparse_total,
        dense_accuracy, sparse_accuracy, round(time.perf_counter() - start, 3),
    )
