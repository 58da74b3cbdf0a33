"""Grain stream over a real tiny cache: batch contents vs positions, bucket / pad, resume, process sharding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support.fixtures_data import SPECS, tiny_config, with_data
from dreamomni2_jax.layout import ids_flux1 as positions
from dreamomni2_jax.cache.records import CacheError, decode_record, load_index
from dreamomni2_jax.data.stream import CacheStream, ModelDims, SyntheticSource, make_train_stream

KEYS = ("target", "references", "img_ids", "img_mask", "text", "pooled")


def records(cache):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for s in load_index(cache)["shards"]:
        r = ArrayRecordReader(str(cache / s["file"]))
        out += [decode_record(b)[0] for b in r.read(list(range(s["num_records"])))]
        r.close()
    return out


def identify(batch, recs) -> list[int]:
    """Which cached record each batch row is (by its pooled prompt embedding: instructions are distinct)."""
    out = []
    for p in batch["pooled"]:
        (hit,) = [i for i, r in enumerate(recs) if np.array_equal(r["pooled"], p)]
        out.append(hit)
    return out


def check_batch(batch, recs, rows, scheme="dreamomni2"):
    """Every array equals what positions / the cached records give for these records."""
    assert set(batch) == set(KEYS)
    layouts = [positions.SampleLayout(recs[i]["target"].shape[:2],
                                      tuple(recs[i][f"ref{j}"].shape[:2] for j in range(sum(k.startswith("ref")
                                                                                            for k in recs[i]))))
               for i in rows]
    t_len = batch["target"].shape[1]
    r_len = batch["references"].shape[1]
    lay = positions.batch_layout(layouts, scheme, t_len, r_len)
    np.testing.assert_array_equal(batch["img_ids"], lay.ids)
    np.testing.assert_array_equal(batch["img_mask"], lay.mask)
    assert batch["img_ids"].dtype == np.int32 and batch["img_mask"].dtype == bool
    for b, (i, lt) in enumerate(zip(rows, layouts)):
        t = positions.pack_latents(recs[i]["target"][None])[0]
        np.testing.assert_array_equal(batch["target"][b, : len(t)], t)
        assert not batch["target"][b, len(t):].any()
        refs = [positions.pack_latents(recs[i][f"ref{j}"][None])[0] for j in range(len(lt.references))]
        r = np.concatenate(refs)
        np.testing.assert_array_equal(batch["references"][b, : len(r)], r)
        assert not batch["references"][b, len(r):].any()
        np.testing.assert_array_equal(batch["text"][b], recs[i]["text"])
    return layouts


def test_bucket_batches_equal_positions_and_cover_the_data(tiny_cache):
    cfg, _, cache = tiny_cache
    recs = records(cache)
    stream = make_train_stream(cfg)
    assert isinstance(stream, CacheStream) and stream.steps_per_epoch == 4  # buckets of 3, 2, 1 with batch 2
    seen = []
    for _ in range(stream.steps_per_epoch):
        batch = next(stream)
        rows = identify(batch, recs)
        layouts = check_batch(batch, recs, rows)
        assert len(set(layouts)) == 1 and batch["img_mask"].all()  # one shape bucket, no padding
        seen += rows
    assert set(seen) == set(range(len(SPECS)))  # an epoch covers every record
    t5, pooled = stream.empty_prompt
    empty, _ = decode_record((cache / "empty_prompt.rec").read_bytes())
    np.testing.assert_array_equal(t5, empty["text"])
    np.testing.assert_array_equal(pooled, empty["pooled"])
    assert t5.shape == (32, 32) and pooled.shape == (32,)


def test_pad_batches_use_masks_and_round_up(tiny_cache):
    cfg, _, cache = tiny_cache
    recs = records(cache)
    stream = CacheStream(with_data(cfg, batching="pad", batch_size=3), pad_multiple=8)
    assert stream.steps_per_epoch == 2
    seen = []
    for _ in range(2):
        batch = next(stream)
        rows = identify(batch, recs)
        layouts = check_batch(batch, recs, rows)
        t_len, r_len = batch["target"].shape[1], batch["references"].shape[1]
        assert t_len % 8 == 0 and r_len % 8 == 0
        assert t_len - 8 < max(s.target_tokens for s in layouts) <= t_len
        assert r_len - 8 < max(s.reference_tokens for s in layouts) <= r_len
        assert batch["img_mask"].sum(1).tolist() == [s.target_tokens + s.reference_tokens for s in layouts]
        seen += rows
    assert sorted(seen) == list(range(len(SPECS)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batch(tiny_cache, workers):
    cfg, _, _ = tiny_cache
    cfg = with_data(cfg, batching="pad", shuffle_seed=3)
    first = CacheStream(cfg)
    for _ in range(3):
        next(first)
    state = json.dumps(first.get_state())
    expected = [next(first) for _ in range(6)]  # crosses two epoch boundaries (3 steps per epoch)
    first.close()
    resumed = CacheStream(with_data(cfg, num_workers=workers))
    resumed.set_state(json.loads(state))
    try:
        for want in expected:
            got = next(resumed)
            for k in KEYS:
                np.testing.assert_array_equal(got[k], want[k])
        assert resumed.get_state()["step"] == 9
    finally:
        resumed.close()
    other = CacheStream(with_data(cfg, shuffle_seed=4))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(json.loads(state))


@pytest.mark.parametrize("batching", ["bucket", "pad"])
def test_processes_get_disjoint_shares_with_equal_shapes(tiny_cache, batching):
    cfg, _, cache = tiny_cache
    recs = records(cache)
    cfg = with_data(cfg, batching=batching, batch_size=2)
    p0, p1 = CacheStream(cfg, 0, 2), CacheStream(cfg, 1, 2)
    seen = []
    for _ in range(p0.steps_per_epoch):
        b0, b1 = next(p0), next(p1)
        assert all(b0[k].shape == b1[k].shape for k in KEYS) and b0["text"].shape[0] == 1
        r0, r1 = identify(b0, recs), identify(b1, recs)
        check_batch(b0, recs, r0)
        check_batch(b1, recs, r1)
        seen += [(r0[0], r1[0])]
    flat = [i for pair in seen for i in pair]
    assert set(flat) == set(range(len(SPECS)))
    if batching == "pad":  # 6 records / global batch 2: an epoch is an exact partition
        assert sorted(flat) == list(range(len(SPECS)))
    with pytest.raises(ValueError, match="divisible"):
        CacheStream(with_data(cfg, batch_size=3), 0, 2)


def test_missing_or_incomplete_cache_is_a_clear_error(tmp_path, tiny_cache):
    with pytest.raises(CacheError, match="index.json not found"):
        CacheStream(tiny_config(cache_dir=tmp_path))
    with pytest.raises(CacheError, match="mount the bucket"):
        CacheStream(tiny_config(cache_dir="gs://bucket/cache"))
    cfg, _, cache = tiny_cache
    copy = tmp_path / "c"
    copy.mkdir()
    (copy / "index.json").write_text((cache / "index.json").read_text())
    with pytest.raises(CacheError, match="shard-00000.array_record listed in index.json is missing"):
        CacheStream(with_data(cfg, cache_dir=str(copy)))


def test_synthetic_source_from_model_dims(tiny_converted_dir):
    cfg = tiny_config(tiny_converted_dir, batch_size=4)
    stream = make_train_stream(cfg, 1, 2)
    assert isinstance(stream, SyntheticSource)
    assert stream.dims == ModelDims(latent_channels=4, text_dim=32, pooled_dim=32, downscale=8)
    batch = next(stream)
    # target 96x64 px -> latent 8x12; references 64x64 and 96x96 px (w, h)
    lay = positions.batch_layout([positions.SampleLayout((8, 12), ((8, 8), (12, 12)))] * 2)
    assert batch["target"].shape == (2, 24, 16) and batch["references"].shape == (2, 16 + 36, 16)
    np.testing.assert_array_equal(batch["img_ids"], lay.ids)
    assert batch["img_mask"].all() and batch["text"].shape == (2, 32, 32) and batch["pooled"].shape == (2, 32)
    assert batch["target"].dtype == np.float32 and stream.empty_prompt[0].shape == (32, 32)
    second = next(stream)
    state = stream.get_state()
    third = next(stream)
    again = SyntheticSource(cfg, stream.dims, 1, 2)
    again.set_state(state)
    assert np.array_equal(next(again)["target"], third["target"])
    assert not np.array_equal(second["target"], third["target"])
