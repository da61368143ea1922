"""Image sources (fkdstore.sources) and the epoch preload (fkdstore.preload): every source against the folder
source (same TorchDataset items, same generate output), the strict key and size checks, worker safety
(forked DataLoader workers, pickling), the bounded read-ahead, and the preloaded label path against the
per-batch one. S3 (moto) tests are marked slow, as in tests/test_s3.py."""

from __future__ import annotations

import io
import pickle
import tarfile
import threading
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fkdstore
from fkdstore import sources
from fkdstore.errors import ImageReadError, IncompleteStoreError, StorageError, ValidationError
from fkdstore.images import list_images
from fkdstore.preload import EpochRecords
from fkdstore.pytorch import epoch_slots, epoch_slots_many
from fkdstore.sources import FileSource, MapSource, TarSource, URLSource, as_source
from fkdstore.testing import tiny_cnn

N, M, C = 12, 6, 5
GEN = dict(crops_per_image=4, num_classes=C, codec={"name": "ms", "k": 3}, input_size=24, images_per_shard=4,
           batch_size=8, num_workers=0, progress=False, device="cpu")


# --------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 images of different sizes (PNG and JPEG) in 3 class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N):
        h, w = (int(v) for v in rng.integers(20, 60, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = "png" if i % 2 else "jpg"
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 3}" / f"im{i:02d}.{ext}")
    return root


def _write_tars(folder: Path, out: Path, per_shard: int = 5, cls: bool = False) -> list[str]:
    """WebDataset shards of the folder's images (members ``<class>/<stem>.<ext>``, folder order)."""
    out.mkdir(parents=True, exist_ok=True)
    listing = list_images(folder)
    paths = []
    for s in range(0, len(listing), per_shard):
        p = out / f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(p, "w") as tf:
            for j in range(s, min(len(listing), s + per_shard)):
                tf.add(listing.paths[j], arcname=listing.keys[j])
                if cls:
                    data = str(listing.labels[j]).encode()
                    info = tarfile.TarInfo(listing.keys[j].rsplit(".", 1)[0] + ".cls")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(p))
    return paths


def _store(path, source, labels=None):
    """A store over ``source``'s keys with the same crops and soft labels whatever the source (so TorchDataset
    items are comparable); ground-truth ``labels`` (default -1 each: items then take the source's)."""
    rng = np.random.default_rng(1)
    sizes = np.asarray(source.header_sizes(), dtype=np.int64)
    h = rng.integers(4, sizes[:, None, 0] + 1, (N, M))
    w = rng.integers(4, sizes[:, None, 1] + 1, (N, M))
    boxes = np.stack([(rng.random((N, M)) * (sizes[:, None, 0] - h + 1)).astype(int),
                      (rng.random((N, M)) * (sizes[:, None, 1] - w + 1)).astype(int), h, w], -1)
    probs = rng.dirichlet(np.ones(C), (N, M)).astype(np.float32)
    w_ = fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C,
                        codec={"name": "full", "dtype": "float32"}, image_keys=source.keys, image_sizes=sizes,
                        labels=np.full(N, -1) if labels is None else np.asarray(labels),
                        images_per_chunk=2, images_per_shard=4)
    with w_:
        w_.put(np.arange(N), boxes, rng.random((N, M)) < 0.5, probs)
    return path


def _ds(store, images, **kw):
    """TorchDataset with 2 crops of 16 px per item (small and independent of the store's replay parameters)."""
    return fkdstore.TorchDataset(store, images, **{"crops_per_sample": 2, "output_size": 16, **kw})


class BytesMap:
    """A user's map-style source: encoded bytes by key, with size(), label() and classes."""

    def __init__(self, folder):
        lst = list_images(folder)
        self._data = {k: Path(p).read_bytes() for k, p in zip(lst.keys, lst.paths)}
        self._sizes = {k: Image.open(p).size[::-1] for k, p in zip(lst.keys, lst.paths)}
        self._labels = dict(zip(lst.keys, lst.labels))
        self.classes = lst.classes

    def keys(self):
        return list(self._data)

    def __getitem__(self, key):
        return self._data[key]

    def size(self, key):
        return self._sizes[key]

    def label(self, key):
        return self._labels[key]


def _hf_dataset(folder):
    datasets = pytest.importorskip("datasets")
    lst = list_images(folder)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=lst.classes),
                               "name": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"img": [{"bytes": Path(p).read_bytes(), "path": None} for p in lst.paths], "label": lst.labels,
         "name": lst.keys}, features=feats)


def _source(kind: str, folder: Path, tmp: Path):
    lst = list_images(folder)
    if kind == "folder":
        return as_source(folder)
    if kind == "file list":
        return as_source(lst.paths)
    if kind == "tar files":
        return as_source(_write_tars(folder, tmp / "tars", cls=True))
    if kind == "tar folder":
        _write_tars(folder, tmp / "tars")
        return as_source(tmp / "tars")
    if kind == "tar braces":
        _write_tars(folder, tmp / "tars")
        return as_source(str(tmp / "tars" / "shard-{000000..000002}.tar"))
    if kind == "dict of paths":
        src = as_source(dict(zip(lst.keys, lst.paths)))
        src.labels, src.classes = lst.labels, lst.classes  # a plain dict has no labels: compare with the folder's
        return src
    if kind == "user map":
        return as_source(BytesMap(folder))
    if kind == "datasets":
        return sources.HFSource(_hf_dataset(folder), key_column="name")
    raise AssertionError(kind)


KINDS = ["file list", "tar files", "tar folder", "tar braces", "dict of paths", "user map", "datasets"]


def _same_items(a, b):
    assert len(a) == len(b)
    for e in (0, 1):
        a.set_epoch(e)
        b.set_epoch(e)
        for x, y in zip(a.__getitems__(list(range(len(a)))), b.__getitems__(list(range(len(b))))):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


# --------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", KINDS)
def test_each_source_gives_the_folder_items(kind, folder, tmp_path):
    ref = as_source(folder)
    src = _source(kind, folder, tmp_path)
    assert len(src) == N
    if kind == "file list":  # no classes: the store's labels serve
        assert src.labels == [-1] * N and src.classes == []
    else:
        assert src.labels == ref.labels and list(src.classes) in (ref.classes, [])
    assert src.header_sizes() == ref.header_sizes() == [src.size(i) for i in range(N)]
    for i in (0, 5, N - 1):
        assert np.array_equal(np.asarray(src.load(i)), np.asarray(ref.load(i)))
    want = _ds(_store(tmp_path / "ref.fkd", ref), folder)
    got = _ds(_store(tmp_path / "src.fkd", src, ref.labels if kind == "file list" else None), src)
    _same_items(got, want)


def test_tar_keys_labels_and_names(folder, tmp_path):
    paths = _write_tars(folder, tmp_path / "t", cls=True)
    src = TarSource(paths)
    lst = list_images(folder)
    assert src.keys == [k.rsplit(".", 1)[0] for k in lst.keys]  # member stems, in shard and member order
    assert src.labels == lst.labels and src.classes == []  # from the .cls members
    assert src.name(6) == f"{paths[1]}:{src.keys[6]}.{lst.keys[6].rsplit('.', 1)[1]}"
    no_cls = TarSource(_write_tars(folder, tmp_path / "u"))
    assert no_cls.labels == lst.labels and no_cls.classes == lst.classes  # from the key's folder part


def test_tar_errors(folder, tmp_path):
    lst = list_images(folder)
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as tf:
        tf.add(lst.paths[0], arcname="a/x.png")
        tf.add(lst.paths[1], arcname="a/x.jpg")
    with pytest.raises(ValidationError, match=r"one image per key: key 'a/x' has 'a/x.png' in .*dup.tar and 'a/x.jpg'"):
        TarSource(dup)
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    for p in (one, two):
        with tarfile.open(p, "w") as tf:
            tf.add(lst.paths[0], arcname="k.png")
    with pytest.raises(ValidationError, match=r"key 'k' has 'k.png' in .*one.tar and 'k.png' in .*two.tar"):
        TarSource([one, two])
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        tf.add(lst.paths[0], arcname="k.png")
        info = tarfile.TarInfo("k.cls")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(ValidationError, match=r"bad.tar:k.cls: a .cls member must hold an integer class index. "
                                              r"Got 'cat'"):
        TarSource(bad)
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    with pytest.raises(ValidationError, match="junk.tar cannot be read as a tar file"):
        TarSource(tmp_path / "junk.tar")
    with pytest.raises(FileNotFoundError, match="tar shard not found"):
        TarSource(tmp_path / "none.tar")
    with pytest.raises(ValidationError, match=r"must count up"):
        sources.expand_braces("s-{3..1}.tar")
    assert sources.expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]


def _rewrite(shard: str, drop: str | None = None, resize: str | None = None) -> None:
    """Rewrite a tar shard without member ``drop`` and with member ``resize`` re-encoded at 7 x 9 px."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name == drop:
                continue
            if m.name == resize:
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).resize((7, 9)).save(buf, "JPEG")
                data, m.size = buf.getvalue(), len(buf.getvalue())
            tf.addfile(m, io.BytesIO(data))


def test_key_binding_and_size_check_stay_strict(folder, tmp_path):
    """A store key missing from a tar source and an image whose size changed: named errors, as for folders."""
    paths = _write_tars(folder, tmp_path / "a")
    store = _store(tmp_path / "s.fkd", TarSource(paths))
    _rewrite(paths[0], drop="c1/im01.png")
    with pytest.raises(FileNotFoundError, match=r"image 'c1/im01' \(store index 4\) is missing from 3 tar shards"):
        _ds(store, paths)
    changed = _write_tars(folder, tmp_path / "b")
    _rewrite(changed[0], resize="c0/im06.jpg")
    ds = _ds(store, changed)
    ds[1]
    with pytest.raises(ValidationError, match=r"image 2 \(.*shard-000000.tar:c0/im06.jpg\) has size \(height=9, "
                                              r"width=7\) but the store recorded"):
        ds[2]


def test_map_source_protocol_and_errors(folder):
    lst = list_images(folder)
    src = as_source(BytesMap(folder))
    assert isinstance(src, MapSource) and src.keys == lst.keys and src.classes == lst.classes
    assert src.labels == lst.labels
    with pytest.raises(TypeError, match="image keys must be str. Got 3"):
        as_source({3: "x.png"})
    src = as_source({"a": 42})
    with pytest.raises(TypeError, match=r"\['a'\] must be a PIL image, encoded bytes or a file path. Got int"):
        src.load(0)
    with pytest.raises(ImageReadError, match=r"cannot read image 'a' in the dict image source"):
        as_source({"a": b"not an image"}).load(0)
    pil = as_source({"a": Image.open(lst.paths[1])})
    assert pil.size(0) == tuple(reversed(Image.open(lst.paths[1]).size)) and pil.load(0).mode == "RGB"
    with pytest.raises(TypeError, match="images must be a folder, a list of files, a URL"):
        as_source(42)
    with pytest.raises(TypeError, match="storage_options apply to URLs only"):
        as_source(folder, storage_options={"anon": True})


def test_datasets_source_keys_labels_and_errors(folder):
    ds = _hf_dataset(folder)
    import datasets

    src = as_source(ds)  # keys from the row index, labels and classes from the ClassLabel column
    lst = list_images(folder)
    assert isinstance(src, sources.HFSource)
    assert src.keys == [str(i) for i in range(N)] and src.labels == lst.labels and src.classes == lst.classes
    shuffled = sources.HFSource(ds.select([3, 1, 2]), key_column="name")  # an indices mapping is followed
    assert shuffled.keys == [lst.keys[3], lst.keys[1], lst.keys[2]]
    assert np.array_equal(np.asarray(shuffled.load(0)), np.asarray(FileSource(folder).load(3)))
    with pytest.raises(TypeError, match=r"one split of a DatasetDict \(e.g. dataset\['train'\]\)"):
        as_source(datasets.DatasetDict({"train": ds}))
    with pytest.raises(ValidationError, match="image_column must name the dataset's image column: it has 0"):
        sources.HFSource(ds.remove_columns("img"))
    with pytest.raises(ValidationError, match="key_column must be a column"):
        sources.HFSource(ds, key_column="nope")


def test_generate_from_each_source_equals_the_folder_run(folder, tmp_path):
    """fkdstore.generate takes any source: tar shards, a user map and (if installed) a datasets.Dataset
    give the folder run's store, array for array (keys apart for tar shards: member stems)."""
    want = fkdstore.generate(tiny_cnn(C), folder, tmp_path / "ref.fkd", **GEN)
    kinds = ["tar files", "user map"] + (["datasets"] if _has_datasets() else [])
    for kind in kinds:
        got = fkdstore.generate(tiny_cnn(C), _source(kind, folder, tmp_path / kind), tmp_path / f"{kind}.fkd", **GEN)
        names = [*got.header.per_image_arrays, *got.per_crop_arrays]
        for n in names:
            if n == "key" and kind == "tar files":
                continue
            assert np.array_equal(got.array(n)[:], want.array(n)[:]), (kind, n)
        assert got.meta["classes"] == (want.meta["classes"] if kind != "tar files" else [])


def _has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------- workers, read-ahead


def test_sources_in_forked_workers_and_after_pickling(folder, tmp_path):
    src = TarSource(_write_tars(folder, tmp_path / "t"), read_ahead=4)
    ds = _ds(_store(tmp_path / "s.fkd", src), src)
    ds[0]  # starts the read-ahead thread in this process
    assert src.__dict__.get("_ra") is not None
    blob = pickle.dumps(src)
    assert b"_ra" not in blob and b"Thread" not in blob
    clone = pickle.loads(blob)
    assert np.array_equal(np.asarray(clone.load(3)), np.asarray(src.load(3)))
    kw = dict(batch_size=5, collate_fn=fkdstore.collate)
    want = list(torch.utils.data.DataLoader(ds, num_workers=0, **kw))
    got = list(torch.utils.data.DataLoader(ds, num_workers=2, multiprocessing_context="fork", **kw))
    for a, b in zip(got, want, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_read_ahead_is_bounded_and_in_order(folder, tmp_path):
    """Announced images are fetched in windows of read_ahead / 2, window w only once window w - 1 is being
    taken: at most read_ahead images fetched and not yet loaded."""
    src = TarSource(_write_tars(folder, tmp_path / "t"), read_ahead=4)
    calls, loaded, lock = [], [], threading.Lock()
    fetch = src._fetch

    def counting(indices, header=False):
        with lock:
            calls.append((list(indices), len(loaded)))
        return fetch(indices, header)

    src._fetch = counting
    order = [7, 3, 11, 0, 5, 9, 2]
    src.prefetch(order)
    for i in order:
        src.load(i)
        with lock:
            loaded.append(i)
            outstanding = sum(len(c) for c, _ in calls) - len(loaded)
        assert outstanding <= 4
    assert [c for c, _ in calls] == [[7, 3], [11, 0], [5, 9], [2]]
    # window 2 is submitted when image 2 is taken, window 3 when image 4 is: never fetched earlier (the pool thread
    # may start the fetch a little later, so only the lower bound is exact)
    started = [n for _, n in calls]
    assert started[2] >= 2 and started[3] >= 4
    calls.clear()
    src.load(1)  # not announced: read directly
    assert calls == [([1], len(loaded))]


# --------------------------------------------------------------------------------------------- epoch preload


def test_epoch_slots_many_equals_epoch_slots():
    for M_, m, e in [(6, 2, 0), (6, 2, 4), (6, 4, 1), (5, 3, 2), (7, 7, 3)]:  # within and across permutations
        want = np.stack([epoch_slots(i, e, m, M_, 5) for i in range(9)])
        assert np.array_equal(epoch_slots_many(range(9), e, m, M_, 5), want)


def test_preloaded_labels_equal_per_batch_reads(folder, tmp_path):
    """preload=True: set_epoch reads the epoch into shared memory; items equal the per-batch path's, in
    this process, in forked (persistent) workers and in a copy passed as spawn would (torch's pickler)."""
    src = FileSource(folder)
    store = _store(tmp_path / "s.fkd", src)
    pre = _ds(store, folder, preload=True)
    per = _ds(store, folder)
    assert pre._preload is not None and per._preload is None  # local stores read by batch by default
    _same_items(pre, per)
    kw = dict(batch_size=4, collate_fn=fkdstore.collate, num_workers=2, multiprocessing_context="fork",
              persistent_workers=True)
    loader = torch.utils.data.DataLoader(pre, **kw)
    for e in (0, 1, 2):
        pre.set_epoch(e)
        per.set_epoch(e)
        want = list(torch.utils.data.DataLoader(per, batch_size=4, collate_fn=fkdstore.collate))
        for a, b in zip(loader, want, strict=True):
            assert torch.equal(a["soft_labels"], b["soft_labels"]) and torch.equal(a["slots"], b["slots"])
    spawned = ForkingPickler.loads(bytes(ForkingPickler.dumps(pre)))  # how a spawned worker receives it
    pre.set_epoch(5)  # refilled in place: the copy sees epoch 5's records
    per.set_epoch(5)
    assert spawned.epoch == 5 and spawned._preload.epoch == 5
    assert torch.equal(spawned[3]["soft_labels"], per[3]["soft_labels"])


def test_preload_needs_a_complete_store(folder, tmp_path):
    src = FileSource(folder)
    store = _store(tmp_path / "s.fkd", src)
    r = fkdstore.open(store)
    w = fkdstore.write(tmp_path / "part.fkd", num_images=N, crops_per_image=M, num_classes=C,
                       codec={"name": "full", "dtype": "float32"}, image_keys=src.keys, image_sizes=r.image_sizes)
    with w:
        rec = r.read_batch(np.arange(4))
        w.put(np.arange(4), rec.box, rec.flip, r.decode(rec.fields))
    with pytest.raises(IncompleteStoreError, match="preload=True needs a complete store"):
        _ds(tmp_path / "part.fkd", folder, allow_incomplete=True, preload=True)
    with pytest.raises(TypeError, match="preload must be True, False or None"):
        _ds(store, folder, preload="yes")


def test_epoch_records_before_any_fill_raise_and_hold_nothing():
    """An EpochRecords that was never filled holds epoch -1 and no buffer; asking it for records says so
    instead of failing on the missing buffer."""
    pre = EpochRecords()
    assert pre.epoch == -1 and pre.nbytes == 0
    with pytest.raises(RuntimeError, match=r"holds no records yet: fill\(\) it"):
        pre.records(np.arange(2))


# --------------------------------------------------------------------------------------------- S3 (moto)


def _upload(fs, local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe(url[len("s3://"):] + "/" + p.relative_to(local).as_posix(), p.read_bytes())


@pytest.mark.slow
def test_s3_images_and_tar_shards_give_the_folder_items(s3, s3_server, folder, tmp_path):
    url, so = s3
    fs = s3_server.filesystem()
    _upload(fs, folder, url + "/images")
    _write_tars(folder, tmp_path / "tars", cls=True)
    _upload(fs, tmp_path / "tars", url + "/tars")
    src = as_source(url + "/images/", storage_options=so)
    assert isinstance(src, URLSource) and src.keys == list_images(folder).keys and src.where == url + "/images/"
    assert src.name(0) == f"{url}/images/{src.keys[0]}"
    tars = as_source(url + "/tars", storage_options=so)  # a prefix holding only .tar objects
    braces = as_source(url + "/tars/shard-{000000..000002}.tar", storage_options=so)
    local_tars = TarSource(_write_tars(folder, tmp_path / "x"))
    assert isinstance(tars, TarSource) and tars.keys == braces.keys == local_tars.keys
    ref = as_source(folder)
    want = _ds(_store(tmp_path / "ref.fkd", ref), folder)
    for s in (src, tars):
        assert s.header_sizes() == ref.header_sizes() and s.labels == ref.labels
        _same_items(_ds(_store(tmp_path / f"{id(s)}.fkd", s), s), want)
    # a URL string with storage_options, forked workers (each rebuilds its filesystem), pickling
    ds = _ds(_store(tmp_path / "u.fkd", src), url + "/images/", storage_options=so)
    assert b"S3FileSystem" not in pickle.dumps(ds)
    want.set_epoch(0)
    kw = dict(batch_size=5, collate_fn=fkdstore.collate)
    for a, b in zip(torch.utils.data.DataLoader(ds, num_workers=2, multiprocessing_context="fork", **kw),
                    torch.utils.data.DataLoader(want, **kw), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        as_source("s3://no-such-bucket/train/", storage_options=so)
    with pytest.raises(ValidationError, match=r"no images found under s3://fkd/.*/nothing/"):
        as_source(url + "/nothing/", storage_options=so)


@pytest.mark.slow
def test_generate_from_s3_images_equals_local(s3, s3_server, folder, tmp_path):
    url, so = s3
    _upload(s3_server.filesystem(), folder, url + "/images")
    want = fkdstore.generate(tiny_cnn(C), folder, tmp_path / "ref.fkd", **GEN)
    got = fkdstore.generate(tiny_cnn(C), url + "/images", tmp_path / "s3.fkd", storage_options=so, **GEN)
    for n in [*got.header.per_image_arrays, *got.per_crop_arrays]:
        assert np.array_equal(got.array(n)[:], want.array(n)[:]), n


@pytest.mark.slow
def test_remote_label_path_equals_local_and_reads_nothing_per_batch(s3, s3_server, folder, tmp_path):
    """TorchDataset on an S3 store preloads each epoch (default for URLs) and equals the per-batch path on a
    local copy, in forked workers too; once an epoch is loaded, iterating sends no request to the store."""
    url, _ = s3
    src = FileSource(folder)
    local = _store(tmp_path / "s.fkd", src)
    s3_server.filesystem().put(str(local) + "/", url[len("s3://"):] + "/s.fkd/", recursive=True)
    proxy = s3_server.storage_options(proxy=True)
    remote = _ds(url + "/s.fkd", folder, storage_options=proxy)
    per = _ds(local, folder)
    assert remote._preload is not None
    _same_items(remote, per)
    kw = dict(batch_size=4, collate_fn=fkdstore.collate)
    for e in (2, 3):
        remote.set_epoch(e)
        per.set_epoch(e)
        s3_server.proxy_stats(reset=True)
        got = list(torch.utils.data.DataLoader(remote, num_workers=2, multiprocessing_context="fork", **kw))
        assert s3_server.proxy_stats()["requests"] == 0
        for a, b in zip(got, torch.utils.data.DataLoader(per, **kw), strict=True):
            for k in a:
                assert torch.equal(a[k], b[k]), k
