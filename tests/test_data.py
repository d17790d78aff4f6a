"""Real video input: shard converter, record/list/TFDS sources, sampling, augmentation, per-host
sharding, skipping bad input, and pre-training on tfrecord and video files (exact resume)."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_st_jax import evaluate
from mae_st_jax.data import augment, fake_videos, make_shards, pipeline, records, sampling, sources, video_io
from mae_st_jax.data.errors import BadVideo, DataError
from mae_st_jax.train import pretrain
from mae_st_jax.train.logging import read_metrics

# name, codec, fps, width, height, frames, class; c.mkv is shorter than a 4-frame clip at rate 4 (12.8 frames)
VIDEOS = [("a.mp4", "h264", 30, 64, 48, 90, "cat"), ("b.mp4", "mpeg4", 24, 48, 64, 80, "dog"),
          ("c.mkv", "h264", 24, 56, 40, 12, "fish"), ("d.avi", "mpeg4", 30, 64, 48, 60, "cat"),
          ("e.mp4", "h264", 24, 48, 48, 70, "dog"), ("f.mp4", "mpeg4", 30, 64, 40, 75, "fish"),
          ("g.mkv", "h264", 30, 40, 64, 66, "cat"), ("h.mp4", "h264", 30, 64, 48, 50, "dog")]
CLASSES = ["cat", "dog", "fish"]
NUM_SHARDS = 4


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Eight small videos (H.264 with key frames every 12 frames, MPEG-4 part 2; 24 and 30 fps) in
    mp4/mkv/avi, a corrupt one and a missing one, listed in list.csv with class names."""
    root = tmp_path_factory.mktemp("videos")
    for k, (name, codec, fps, w, h, n, _) in enumerate(VIDEOS):
        fake_videos.write_video(str(root / name), fake_videos.shape_frames(n, h, w, seed=k, label=k % 8), fps=fps,
                                codec=codec, options={"g": "12"})
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    lines = [f"{name},{cls}" if k % 2 else f"{name} {cls}" for k, (name, *_, cls) in enumerate(VIDEOS)]
    (root / "list.csv").write_text("\n".join(lines + ["bad.mp4 cat", "missing.mp4,dog"]) + "\n")
    return root


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    summary = make_shards.convert(str(videos / "list.csv"), str(out), NUM_SHARDS, short_side=40, workers=2)
    return out, summary


def _config(tiny_config, source, path):
    tiny_config.data.update(source=source, path=str(path), sampling_rate=4)
    return tiny_config


def test_converter_round_trip(videos, shards):
    out, summary = shards
    assert summary == {"videos": 10, "written": 8, "skipped": 2, "shards": NUM_SHARDS, "shards_reused": 0}
    skipped = dict(line.split("\t") for line in (out / "list-skipped.txt").read_text().splitlines())
    assert sorted(os.path.basename(p) for p in skipped) == ["bad.mp4", "missing.mp4"]
    assert skipped[str(videos / "bad.mp4")].startswith("undecodable")
    assert skipped[str(videos / "missing.mp4")] == "missing file"
    assert (out / "classes.txt").read_text().split() == CLASSES
    seen = {}
    for shard in sorted(out.glob("*.tfrecord")):
        for data in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            parsed = records.parse_video(data)
            seen[parsed.name] = parsed
            seq = tf.train.SequenceExample.FromString(data)
            assert seq.context.feature[records.LABEL_STRING].bytes_list.value[0].decode() == CLASSES[parsed.label]
    assert len(seen) == 8
    source = sources.TFRecordVideos(str(out / "*.tfrecord"))
    assert source._meta is not None  # the .index.json beside each shard: no record read to know a video
    assert sorted(source.info(k).num_frames for k in range(8)) == sorted(v[5] for v in VIDEOS)
    for name, codec, fps, w, h, n, cls in VIDEOS:
        parsed = seen[os.path.splitext(name)[0]]
        assert (len(parsed.frames), parsed.fps, parsed.label) == (n, fps, CLASSES.index(cls))
        first = records.decode_image(parsed.frames[0])
        assert min(first.shape[:2]) == 40
        source = video_io.read_frames(str(videos / name), [0])[0]
        expected = augment.resize_short_side(source[None], 40)[0]
        assert first.shape == expected.shape
        assert np.abs(first.astype(int) - expected).mean() < 8  # JPEG + resampling differences only
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
    again = make_shards.convert(str(videos / "list.csv"), str(out), NUM_SHARDS, short_side=40, workers=1)
    assert again["shards_reused"] == NUM_SHARDS and again["written"] == 8 and again["skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")} == before


def test_converter_resamples_fps_and_reads_class_folders(videos, tmp_path):
    (tmp_path / "one.txt").write_text(f"{videos / 'a.mp4'} 2\n")  # 90 frames at 30 fps
    make_shards.convert(str(tmp_path / "one.txt"), str(tmp_path / "out"), 1, short_side=0, fps=15, workers=1)
    source = sources.TFRecordVideos(str(tmp_path / "out" / "*.tfrecord"))
    info = source.info(0)
    assert (info.num_frames, info.fps, info.label) == (45, 15.0, 2)
    every_other = video_io.read_frames(str(videos / "a.mp4"), [0, 2, 4])
    assert np.abs(source.frames(0, [0, 1, 2]).astype(int) - every_other).mean() < 3
    for cls, name in (("jump", "c.mkv"), ("run", "h.mp4"), ("run", "e.mp4")):
        (tmp_path / "folders" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(videos / name, tmp_path / "folders" / cls / name)
    summary = make_shards.convert(str(tmp_path / "folders"), str(tmp_path / "out2"), 2, workers=1)
    assert summary["written"] == 3 and (tmp_path / "out2" / "classes.txt").read_text().split() == ["jump", "run"]
    source = sources.TFRecordVideos(str(tmp_path / "out2" / "folders-*.tfrecord"))
    assert sorted((source.info(k).name, source.info(k).label) for k in range(3)) == [("c", 0), ("e", 1), ("h", 1)]


def test_videos_that_share_a_file_name_keep_different_record_names(videos, tmp_path):
    """clip.mp4 in two class folders: each record is named by its path below the shared folder."""
    for cls, name in (("jump", "c.mkv"), ("run", "e.mp4")):
        (tmp_path / "folders" / cls).mkdir(parents=True)
        shutil.copy(videos / name, tmp_path / "folders" / cls / ("clip" + os.path.splitext(name)[1]))
    make_shards.convert(str(tmp_path / "folders"), str(tmp_path / "out"), 1, short_side=0, workers=1)
    source = sources.TFRecordVideos(str(tmp_path / "out" / "*.tfrecord"))
    assert sorted((source.info(k).name, source.info(k).label) for k in range(2)) == [("jump/clip", 0),
                                                                                     ("run/clip", 1)]
    assert make_shards.record_names(["/d/a/x.mp4", "/d/b/y.mp4"]) == ["x", "y"]  # unique file names stay
    assert make_shards.record_names(["gs://b/k/a/x.mp4", "gs://b/k/b/x.mp4", "gs://b/k/x.mp4"]) == [
        "a/x", "b/x", "x"]
    assert make_shards.record_names(["/d/a/x.mp4", "/d/a/x.webm", "/d/b/y.mp4", "/d/a/x.mp4"]) == [
        "a/x.mp4", "a/x.webm", "b/y.mp4", "a/x.mp4"]  # the extension tells them apart; a repeat is one video


def test_videos_source_decodes_only_requested_frames(videos):
    source = sources.VideoFiles(str(videos / "list.csv"))
    assert len(source) == 10 and source.class_names == CLASSES
    rng = np.random.default_rng(0)
    for k, (name, *_, n, _) in enumerate(VIDEOS):
        assert source.info(k).num_frames == n
        everything = np.stack(list(video_io.iter_frames(str(videos / name))[1]))
        for _ in range(4):  # random spans: seeks into the middle of the key frame intervals
            idx = np.sort(rng.integers(0, n + 3, 6))
            np.testing.assert_array_equal(source.frames(k, idx), everything[np.minimum(idx, n - 1)])
    with pytest.raises(BadVideo, match="bad.mp4"):
        source.info(8)
    with pytest.raises(BadVideo, match="missing.mp4"):
        source.info(9)


def _reference_indices(rng, n, fps, num_frames, rate):
    """REFERENCE.md: span = rate * T / 30 * fps; start ~ U(0, max(n - span, 0)); linspace, clamp, truncate."""
    span = rate * num_frames / 30 * fps
    start = rng.uniform(0, max(n - span, 0))
    return np.clip(np.linspace(start, start + span - 1, num_frames), 0, n - 1).astype(np.int64)


class _Spy:
    """A source wrapper that records each frames() call; `constant` repeats each clip's first frame."""

    host_local = True

    def __init__(self, source, constant=False):
        self.source, self.constant, self.calls = source, constant, []

    def __len__(self):
        return len(self.source)

    def info(self, i):
        return self.source.info(i)

    def frames(self, i, idx):
        self.calls.append((i, np.asarray(idx)))
        if self.constant:
            return np.repeat(self.source.frames(i, idx[:1]), len(idx), axis=0)
        return self.source.frames(i, idx)


def test_sampled_indices_equal_reference_formula(shards, tiny_config):
    config = _config(tiny_config, "tfrecord", shards[0] / "*.tfrecord")
    spy = _Spy(sources.TFRecordVideos(config.data.path))
    loader = pipeline.ClipLoader(spy, config)
    slots_per_video = config.data.repeat_aug
    for step in (0, 1):  # one epoch: all 8 videos, c.mkv (12 frames, shorter than the clip) included
        spy.calls.clear()
        loader.batch(step)
        assert len(spy.calls) == config.batch_size // slots_per_video
        for video, idx in spy.calls:
            info = spy.info(video)
            slots = [s for s in range(config.batch_size) if loader._video_index(loader._position(step, s)) == video]
            assert len(slots) == slots_per_video
            expected = [_reference_indices(np.random.default_rng([config.seed, 2, step, s]), info.num_frames,
                                           info.fps, config.model.num_frames, 4) for s in slots]
            np.testing.assert_array_equal(idx, np.concatenate(expected))
            if info.name == "c":
                assert idx.max() == 11 and idx.min() == 0  # clamped to the 12 frames there are
    assert {spy.info(v).name for v in range(len(spy))} == {os.path.splitext(v[0])[0] for v in VIDEOS}


def test_augmentation_one_parameter_set_per_clip(shards, tiny_config):
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = augment.random_resized_crop_box(rng, 256, 320)
        assert 0 <= top <= 256 - h and 0 <= left <= 320 - w
        areas.append(h * w / (256 * 320))
        aspects.append(w / h)
    assert 0.49 < min(areas) < 0.52 and max(areas) <= 1.0 and 0.64 < np.mean(areas) < 0.72  # tries rejected near area 1
    assert 0.74 < min(aspects) < 0.78 and 1.29 < max(aspects) < 1.35
    assert augment.random_resized_crop_box(rng, 100, 1000, tries=0) == (0, 433, 100, 133)  # centre fallback
    image = np.broadcast_to(np.arange(320, dtype=np.uint8)[None, :, None], (256, 320, 3))
    crops = augment.test_crops(np.stack([image, image]), 224)  # short side 256 -> 224: width 280
    assert crops.shape == (3, 2, 224, 224, 3)
    assert [int(c[0, 112, 0, 0]) for c in crops] == [0, 32, 64]  # left / centre / right, 8/7 px per column
    tall = augment.test_crops(np.stack([image.transpose(1, 0, 2)]), 224)
    assert [int(c[0, 0, 112, 0]) for c in tall] == [0, 32, 64]  # top / centre / bottom
    jitter = augment.jitter_crop(rng, np.stack([image] * 2), 64, scales=(72, 80))
    assert jitter.shape == (2, 64, 64, 3)
    # in the loader: a clip whose frames are all equal stays so after crop + resize + flip
    config = _config(tiny_config, "tfrecord", shards[0] / "*.tfrecord")
    batch = pipeline.ClipLoader(_Spy(sources.TFRecordVideos(config.data.path), constant=True), config).batch(0)
    clips = batch["video"].reshape(-1, *batch["video"].shape[2:])
    assert clips.shape == (8, 4, 32, 32, 3)
    for clip in clips:
        assert all(np.array_equal(frame, clip[0]) for frame in clip)
    assert len({clip.tobytes() for clip in clips}) == 8  # repeat_aug clips of a video differ


def test_validation_jitter_draws_as_pyslowfast(monkeypatch):
    """random_short_side_scale_jitter: short side int(round(U(lo, hi))), ends half as likely; random_crop:
    offset randint(0, h - size), never the last one."""
    shorts, offsets = [], []
    resize = augment.resize_short_side
    monkeypatch.setattr(augment, "resize_short_side", lambda f, s: shorts.append(s) or resize(f, s))
    crop = augment.crop_resize
    monkeypatch.setattr(augment, "crop_resize", lambda f, box, *a: offsets.append(box[:2]) or crop(f, box, *a))
    rng = np.random.default_rng(0)
    frames = np.zeros((1, 8, 12, 3), np.uint8)
    for _ in range(6000):
        augment.jitter_crop(rng, frames, 8, scales=(10, 12))  # short side 10, 11 or 12; crop 8
    counts = np.bincount(shorts, minlength=13)[10:]
    np.testing.assert_allclose(counts / len(shorts), [0.25, 0.5, 0.25], atol=0.02)
    tops = np.asarray([o[0] for o in offsets])
    assert tops.min() == 0 and all(t < s - 8 for t, s in zip(tops, shorts))


def test_hosts_read_disjoint_shards(shards, tiny_config):
    pattern = str(shards[0] / "*.tfrecord")
    hosts = [sources.TFRecordVideos(pattern, process_index=i, process_count=2) for i in (0, 1)]
    names = [{h.info(k).name for k in range(len(h))} for h in hosts]
    assert not names[0] & names[1] and len(names[0] | names[1]) == 8
    assert not set(hosts[0].files) & set(hosts[1].files) and len(hosts[0].files) == 2
    with pytest.raises(ValueError, match="fewer than the 5 processes"):
        sources.TFRecordVideos(pattern, process_index=0, process_count=5)
    config = _config(tiny_config, "tfrecord", pattern)
    for i, host in enumerate(hosts):  # a host's batches come from its own videos, repeatably
        spy = _Spy(host)
        a = pipeline.ClipLoader(spy, config, process_index=i, process_count=2).batch(5)
        b = pipeline.ClipLoader(host, config, process_index=i, process_count=2).batch(5)
        assert a["video"].shape == (1, 4, 4, 32, 32, 3)
        np.testing.assert_array_equal(a["video"], b["video"])
        assert {host.info(v).name for v, _ in spy.calls} <= names[i]


def test_same_seed_same_batches(shards, tiny_config):
    config = _config(tiny_config, "tfrecord", shards[0] / "*.tfrecord")
    source = pipeline.make_source(config)
    a, b = (pipeline.ClipLoader(source, config).batch(3) for _ in range(2))
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert int(a["skipped"]) == 0
    assert not np.array_equal(a["video"], pipeline.ClipLoader(source, config).batch(4)["video"])
    config.seed = 1
    assert not np.array_equal(a["video"], pipeline.ClipLoader(source, config).batch(3)["video"])


def test_corrupt_record_is_skipped_and_counted(shards, tiny_config, tmp_path):
    for f in shards[0].glob("*.tfrecord*"):
        shutil.copy(f, tmp_path)
    shard = sorted(tmp_path.glob("*.tfrecord"))[0]
    index = records.load_index(str(shard))
    with open(shard, "r+b") as f:  # zero the first record's payload, its framing intact
        f.seek(index["offsets"][0])
        f.write(bytes(index["lengths"][0]))
    config = _config(tiny_config, "tfrecord", tmp_path / "*.tfrecord")
    source = pipeline.make_source(config)
    with pytest.raises(BadVideo, match="record 0"):
        source.frames(0, [0])
    loader = pipeline.ClipLoader(source, config)
    batches = [loader.batch(s) for s in (0, 1)]  # one epoch: every video once
    assert sum(int(b["skipped"]) for b in batches) == config.data.repeat_aug == loader.skipped_total
    assert all(b["video"].shape == (1, 8, 4, 32, 32, 3) for b in batches)
    # a truncated shard: the records before the cut are still read
    cut = tmp_path / "cut" / "x.tfrecord"
    cut.parent.mkdir()
    shutil.copy(shard, cut)
    with open(cut, "r+b") as f:
        f.truncate(index["offsets"][1] + 10)
    assert len(sources.TFRecordVideos(str(cut))) == 1
    # zero-frame videos: skipped; a shard of nothing else stops after MAX_SKIPS tries, not forever
    empty = tmp_path / "empty" / "e.tfrecord"
    empty.parent.mkdir()
    with tf.io.TFRecordWriter(str(empty)) as w:
        for k in range(3):
            w.write(records.encode_video([], fps=30, label=0, label_name="", path=f"v{k}", name=f"v{k}",
                                         height=8, width=8))
    with pytest.raises(BadVideo, match="0 frames"):
        sources.TFRecordVideos(str(empty)).info(0)
    config.data.path = str(empty)
    with pytest.raises(RuntimeError, match="could not be read"):
        pipeline.ClipLoader(pipeline.make_source(config), config).batch(0)


def test_bad_input_stops_at_start(videos, shards, tiny_config, tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        sources.TFRecordVideos(str(tmp_path / "nothing" / "*.tfrecord"))
    (tmp_path / "gone.txt").write_text("x.mp4 0\ny.mp4 1\n")
    with pytest.raises(ValueError, match="gone.txt names no readable file"):
        sources.VideoFiles(str(tmp_path / "gone.txt"))
    (tmp_path / "broken.txt").write_text(f"{videos / 'a.mp4'} 0\njustapath\n")
    with pytest.raises(ValueError, match="broken.txt:2"):
        sources.VideoFiles(str(tmp_path / "broken.txt"))
    (tmp_path / "labels.txt").write_text(f"{videos / 'a.mp4'} 0\n{videos / 'b.mp4'} 7\n")
    with pytest.raises(ValueError, match="labels.txt entry 2 .* label 7 outside"):
        sources.VideoFiles(str(tmp_path / "labels.txt"), num_classes=5)
    (tmp_path / "unlabelled.txt").write_text(f"{videos / 'a.mp4'} 0\n{videos / 'b.mp4'} -1\n")
    with pytest.raises(ValueError, match="entry 2 .* label -1 outside \\[0, 5\\): .* need a label for every video"):
        sources.VideoFiles(str(tmp_path / "unlabelled.txt"), num_classes=5)
    assert sources.VideoFiles(str(tmp_path / "unlabelled.txt")).labels == [0, -1]  # pre-training: not checked
    with pytest.raises(ValueError, match=r"tfrecord record \d .* label 2 outside \[0, 2\)"):
        sources.TFRecordVideos(str(shards[0] / "*.tfrecord"), num_classes=2)
    config = _config(tiny_config, "tfrecord", shards[0] / "*.tfrecord")
    config.mode, config.data.num_classes = "finetune", 2
    with pytest.raises(ValueError, match="config.data.num_classes"):
        pipeline.make_source(config)
    config.mode = "pretrain"  # pre-training does not use labels
    assert len(pipeline.make_source(config)) == 8


def test_list_labels_are_all_ints_or_all_names(tmp_path):
    def listed(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    # a comma splits a line at its last comma, so Kinetics class names keep their spaces
    paths, labels, names = sources.read_list(listed("k.csv", "a.mp4,air drumming\nb.mp4,tuning guitar\n"
                                                            "c.mp4,playing guitar\nd.mp4,air drumming\n"))
    assert names == ["air drumming", "playing guitar", "tuning guitar"] and labels == [0, 2, 1, 0]
    assert paths == [str(tmp_path / f) for f in ("a.mp4", "b.mp4", "c.mp4", "d.mp4")]
    # a byte-order mark (a list saved by a spreadsheet) is not part of the first path
    assert sources.read_list(listed("bom.csv", "\ufeffa.mp4 1\r\nb.mp4 0\r\n"))[:2] == (
        [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")], [1, 0])
    # one label that is not an int among ints is an error naming both lines, not a renumbering
    with pytest.raises(ValueError, match=r"mixed.csv: line 1 has an integer label \(0\) but line 3 a class name "
                                         r"\('l1'\)"):
        sources.read_list(listed("mixed.csv", "a.mp4 0\nb.mp4 2\nc.mp4 l1\nd.mp4 10\n"))
    with pytest.raises(ValueError, match="line 2 a class name \\('take2.mp4 3'\\)"):  # a comma in a path
        sources.read_list(listed("comma.csv", "a.mp4 0\nclip,take2.mp4 3\n"))
    with pytest.raises(ValueError, match="floats.csv:1: label '0.0' is a number but not an integer"):
        sources.read_list(listed("floats.csv", "a.mp4 0.0\nb.mp4 1.0\nc.mp4 2.0\nd.mp4 10.0\n"))
    # a validation list of names is numbered as the training list (here missing the class 'dog')
    train = listed("train.csv", "a.mp4 cat\nb.mp4 dog\nc.mp4 fish\n")
    val = listed("val.csv", "x.mp4 fish\ny.mp4 cat\n")
    assert sources.read_list(val)[1] == [1, 0]  # its own numbering
    assert sources.read_list(val, sources.read_list(train)[2])[1] == [2, 0]
    with pytest.raises(ValueError, match="class 'bird' is not in the training list's class names"):
        sources.read_list(listed("val2.csv", "x.mp4 bird\n"), ["cat", "dog", "fish"])


def test_validation_list_numbered_as_the_training_list(videos, tiny_config, tmp_path):
    from mae_st_jax.data import validation
    (tmp_path / "val.csv").write_text(f"{videos / 'b.mp4'},dog\n{videos / 'c.mkv'},fish\n")  # no 'cat'
    config = _config(tiny_config, "videos", videos / "list.csv")
    config.mode, config.data.num_classes, config.data.eval_path = "finetune", 3, str(tmp_path / "val.csv")
    source = validation.make_eval_source(config)
    assert [source.info(k).label for k in range(2)] == [CLASSES.index("dog"), CLASSES.index("fish")]


def test_converting_a_second_list_keeps_the_first_numbering(videos, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "train.csv").write_text(f"{videos / 'a.mp4'} cat\n{videos / 'b.mp4'} dog\n{videos / 'c.mkv'} fish\n")
    (tmp_path / "val.csv").write_text(f"{videos / 'e.mp4'} dog\n{videos / 'f.mp4'} fish\n")  # no 'cat'
    make_shards.convert(str(tmp_path / "train.csv"), str(out), 1, short_side=0, workers=1)
    make_shards.convert(str(tmp_path / "val.csv"), str(out), 1, short_side=0, workers=1)
    assert (out / "classes.txt").read_text().split() == ["cat", "dog", "fish"]
    assert (out / "train-skipped.txt").exists() and (out / "val-skipped.txt").exists()  # one per list
    val = sources.TFRecordVideos(str(out / "val-*.tfrecord"))
    assert sorted((val.info(k).name, val.info(k).label) for k in range(2)) == [("e", 1), ("f", 2)]
    (tmp_path / "other.csv").write_text(f"{videos / 'h.mp4'} bird\n")
    with pytest.raises(ValueError, match="is not in .*classes.txt"):
        make_shards.convert(str(tmp_path / "other.csv"), str(out), 1, short_side=0, workers=1)


def test_a_record_whose_bytes_changed_is_skipped(shards, tiny_config, tmp_path):
    for f in shards[0].glob("*.tfrecord*"):
        shutil.copy(f, tmp_path)
    shard = sorted(tmp_path.glob("*.tfrecord"))[0]
    index = records.load_index(str(shard))
    data = bytearray(shard.read_bytes())
    offset, length = index["offsets"][0], index["lengths"][0]
    jpeg = bytes(data[offset:offset + length]).rfind(b"\xff\xd8")  # the last frame's JPEG
    data[offset + jpeg + 600:offset + jpeg + 604] = b"\x00\xff\x00\xff"  # inside its entropy-coded data
    shard.write_bytes(bytes(data))
    parsed = records.parse_video(bytes(data[offset:offset + length]))  # still parses: only the CRC tells
    assert len(parsed.frames) > 1
    source = pipeline.make_source(_config(tiny_config, "tfrecord", tmp_path / "*.tfrecord"))
    with pytest.raises(BadVideo, match="record 0: .* fails its data checksum"):
        source.frames(0, [0])
    assert source.frames(1, [0]).shape[0] == 1  # the other records read as before


def test_a_fifo_is_an_unreadable_video_not_a_hang(tmp_path):
    """av.open on a FIFO (or a device) blocks for ever: such a path is refused before it is opened."""
    os.mkfifo(tmp_path / "f.mp4")
    for read in (video_io.probe, lambda p: video_io.read_frames(p, [0]), lambda p: video_io.iter_frames(p)):
        with pytest.raises(ValueError, match="f.mp4: not a regular file"):
            read(str(tmp_path / "f.mp4"))
    (tmp_path / "list.txt").write_text("f.mp4 0\n")
    source = sources.VideoFiles(str(tmp_path / "list.txt"), num_classes=2)
    with pytest.raises(BadVideo, match="not a regular file"):
        source.info(0)


def test_a_file_shorter_than_its_header_is_sampled_over_its_real_length(tmp_path):
    """A truncated mkv still says 200 frames: a clip past its real end was 16 copies of the last frame,
    never counted. Now the first such read is a counted skip that corrects the count."""
    from mae_st_jax.data.errors import FrameCountChanged

    fake_videos.write_video(str(tmp_path / "full.mkv"), fake_videos.shape_frames(200, 48, 64), fps=25)
    data = (tmp_path / "full.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[:len(data) // 2])
    (tmp_path / "list.txt").write_text("cut.mkv 0\n")
    source = sources.VideoFiles(str(tmp_path / "list.txt"), num_classes=1)
    claimed = source.info(0).num_frames
    assert claimed >= 190
    with pytest.raises(FrameCountChanged, match="the stream ends after"):
        source.frames(0, np.arange(150, 182, 2))
    real = source.info(0).num_frames
    assert 20 < real < 150
    clip = source.frames(0, np.arange(real - 16, real))  # within the real length: distinct frames
    assert len({f.tobytes() for f in clip}) > 8
    tail = source.frames(0, np.arange(real - 12, real + 4))  # a few past the end: padded, as before
    np.testing.assert_array_equal(tail[-5:], np.repeat(tail[-5:-4], 5, axis=0))

def test_an_unreadable_video_is_named_once_whichever_reader_finds_it(tiny_config, caplog):
    """The training loader, the validation clips and the test views share one per-source record of
    the videos already named in a warning; each find is still returned (and counted) by its caller."""
    from mae_st_jax.data import errors, validation

    class Flaky:
        def __init__(self, source, bad):
            self.source, self.bad, self.reads = source, bad, 0

        def __len__(self):
            return len(self.source)

        def info(self, i):
            return self.source.info(i)

        def frames(self, i, idx):
            self.reads += 1
            if i in self.bad:
                raise BadVideo(f"video {i}: moov atom not found")
            return self.source.frames(i, idx)

    flaky = Flaky(pipeline.make_source(tiny_config), {1})
    with caplog.at_level("WARNING"):
        for _ in range(2):
            batch = next(validation.eval_batches(flaky, tiny_config, 4))
            assert batch["valid"].tolist() == [True, False, True, True]
            views = next(evaluate.view_batches(flaky, tiny_config, 4, 1, 1))
            assert views["valid"].tolist() == [True, False, True, True] and views["bad"] == [1]
    assert caplog.text.count("moov atom not found") == 1
    other = Flaky(flaky.source, {1})  # another source: its own record
    with caplog.at_level("WARNING"):
        next(validation.eval_batches(other, tiny_config, 4))
    assert caplog.text.count("moov atom not found") == 2
    errors.warn_once(7, 0, "ints take no weak reference: %s", "warned every time")
    errors.warn_once(7, 0, "ints take no weak reference: %s", "warned every time")
    assert caplog.text.count("warned every time") == 2

    calls = []

    def shorter_once(x):
        calls.append(x)
        if len(calls) == 1:
            raise errors.FrameCountChanged("the stream ends after 40 frames")
        return x * 2

    assert errors.sampled_again_if_shorter(shorter_once, 21) == 42 and calls == [21, 21]
    with pytest.raises(BadVideo, match="other"):  # any other unreadable video is not retried
        errors.sampled_again_if_shorter(lambda: (calls.append(0), (_ for _ in ()).throw(BadVideo("other"))))
    assert calls == [21, 21, 0]


def test_a_read_that_never_returns_stops_the_loader(tiny_config):
    import time

    loader = pipeline.ClipLoader(pipeline.make_source(tiny_config), tiny_config)
    loader.batch = lambda step: time.sleep(3600)  # as a read from a hung mount
    t0 = time.time()
    with pytest.raises(DataError, match="no batch for 2 s: a video read does not return"):
        next(loader.iterate(0, timeout_s=2))
    assert time.time() - t0 < 30
    tiny_config.data.source, tiny_config.data.read_timeout_s = "synthetic", -1
    with pytest.raises(ValueError, match="read_timeout_s=-1 must be >= 0"):
        from mae_st_jax import config_lib
        config_lib.validate(tiny_config, 1)

def test_videos_source_decodes_at_the_reference_short_side(videos, tiny_config):
    """As the reference's decoder (video_min_dimension), frames come resized to short side 256 for 224
    crops (here img_size 32 -> 37), with the same area filter make_shards uses."""
    config = _config(tiny_config, "videos", videos / "list.csv")
    source = pipeline.make_source(config)
    assert source.short_side == round(32 * 256 / 224) == 37
    k = source.paths.index(str(videos / "a.mp4"))  # 64 x 48 (w x h)
    frames = source.frames(k, [0, 5, 30])
    assert frames.shape == (3, 37, 49, 3)  # 49 = floor(64 / 48 * 37)
    resized = list(video_io.iter_frames(str(videos / "a.mp4"), 0.0, width=49, height=37)[1])
    np.testing.assert_array_equal(frames, np.stack([resized[i] for i in (0, 5, 30)]))
    config.data.decode_short_side = 0  # the file's own size
    assert pipeline.make_source(config).frames(k, [0]).shape == (1, 48, 64, 3)



def test_three_crop_test_views_decode_at_the_crop_size(videos, tiny_config):
    """The 3-crop test cuts its crops at short side img_size: a `videos` source decodes there directly
    (one area resize from the file), not at the training decode's 256-for-224 and again to img_size."""
    config = _config(tiny_config, "videos", videos / "list.csv")
    three = evaluate.view_config(config, 3)
    assert three.data.decode_short_side == 32 and config.data.decode_short_side == -1
    assert evaluate.view_config(config, 1) is config  # the one-crop view is cut at 37 (256 for 224)
    source = pipeline.make_source(three)
    assert source.short_side == 32
    k = source.paths.index(str(videos / "a.mp4"))  # 64 x 48 (w x h) -> 42 x 32
    views, _ = evaluate.video_views(source, k, three, 2, 3)
    info = source.info(k)
    decoded = list(video_io.iter_frames(str(videos / "a.mp4"), 0.0, width=42, height=32)[1])
    for t in range(2):
        idx = sampling.test_clip(t, 2, info.num_frames, three.model.num_frames, three.data.sampling_rate, info.fps,
                                 three.data.target_fps)
        clip = np.stack([decoded[i] for i in idx])
        assert clip.shape[1:3] == (32, 42)
        np.testing.assert_array_equal(views[3 * t:3 * t + 3], augment.test_crops(clip, 32))
    config.data.decode_short_side = 0  # set by hand: kept
    assert evaluate.view_config(config, 3) is config

def test_pretrain_on_tfrecord_resumes_bit_exactly(shards, tiny_config, tmp_path):
    config = _config(tiny_config, "tfrecord", shards[0] / "*.tfrecord")
    config.total_steps = 4
    pretrain.train(config, str(tmp_path / "straight"))
    full = {m["step"]: m for m in read_metrics(str(tmp_path / "straight"))}
    assert sorted(full) == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in full.values())
    assert full[4]["data_skipped"] == 0
    config.total_steps = 3  # stops after step 3, saved at the end
    pretrain.train(config, str(tmp_path / "resumed"))
    config.total_steps = 4
    pretrain.train(config, str(tmp_path / "resumed"))
    resumed = {m["step"]: m["loss"] for m in read_metrics(str(tmp_path / "resumed"))}
    assert [resumed[s] for s in (1, 2, 3, 4)] == [full[s]["loss"] for s in (1, 2, 3, 4)]  # bit-identical


def test_pretrain_on_video_files(videos, tiny_config, tmp_path):
    config = _config(tiny_config, "videos", videos / "list.csv")
    config.total_steps = 2
    config.data.max_skip_fraction = 1.0  # 2 of the 10 listed videos are unreadable: don't stop for them
    config.write_reconstruction = True  # frames of any size are centre-cropped for the figure
    pretrain.train(config, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    loader = pipeline.ClipLoader(pipeline.make_source(config), config)
    expected = sum(int(loader.batch(s)["skipped"]) for s in (0, 1))  # bad.mp4 / missing.mp4 if drawn
    assert metrics[-1]["data_skipped"] == expected
    assert (tmp_path / "reconstruction.png").stat().st_size > 0


class TinyVideoClips(tfds.core.GeneratorBasedBuilder):
    """Six short labelled clips stored as JPEG frames (TFDS Video feature)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, 36, 48, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for k in range(6):
            yield k, {"video": np.stack(list(fake_videos.shape_frames(20 + 5 * k, 36, 48, seed=k, label=k))),
                      "label": k % 3}


def test_tfds_source(tiny_config, tmp_path):
    builder = TinyVideoClips(data_dir=str(tmp_path))
    builder.download_and_prepare()
    config = _config(tiny_config, "tfds", "tiny_video_clips")
    config.data.data_dir = str(tmp_path)
    source = pipeline.make_source(config)
    assert len(source) == 6
    lengths = sorted(source.info(k).num_frames for k in range(6))
    assert lengths == [20, 25, 30, 35, 40, 45] and source.info(0).fps == 30.0
    k = next(k for k in range(6) if source.info(k).num_frames == 25)  # example 1, label 1
    assert source.info(k).label == 1
    expected = np.stack(list(fake_videos.shape_frames(25, 36, 48, seed=1, label=1)))[[0, 7, 24]]
    assert np.abs(source.frames(k, [0, 7, 24]).astype(int) - expected).mean() < 4  # JPEG only
    batch = pipeline.ClipLoader(source, config).batch(0)
    assert batch["video"].shape == (1, 8, 4, 32, 32, 3) and set(batch["label"].ravel()) <= {0, 1, 2}
    config.data.path, config.data.data_dir = builder.data_dir, ""  # a dataset directory works too
    assert len(pipeline.make_source(config)) == 6
    config.data.split = "test"
    with pytest.raises(ValueError, match="config.data.split='test'"):
        pipeline.make_source(config)
