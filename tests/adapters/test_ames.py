"""AMES against the official model's outputs (../shared/golden/ames), plus input checks."""
import itertools
import json
import lzma

import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.fusion import fuse_scores
from locore_plugin.io.checkpoints import StateDictMismatchError


def unxz(path, target):
    target.write_bytes(lzma.decompress(path.read_bytes()))
    return target


def images(local, padding):
    """ImageFeatures from the official arrays (mask True = padding)."""
    return [ImageFeatures(local=l, mask=~m) for l, m in zip(local, padding)]


def load_case(case, tmp_path):
    inputs = np.load(case / "inputs.npz")
    return (
        images(inputs["query_local"], inputs["query_mask"]),
        images(inputs["gallery_local"], inputs["gallery_mask"]),
        inputs,
        np.load(case / "outputs.npz"),
        json.loads((case / "config.json").read_text()),
    )


def ames(checkpoint, config, architecture=None, **kw):
    """The case's model: built from its own official constructor arguments (``architecture``
    overrides them; ``{}`` leaves every size to the checkpoint's tensors)."""
    official = config["constructor_kwargs"] if architecture is None else architecture
    binarized = config["constructor_kwargs"]["binarized"]
    kw = {"query_length": config["query_sequence_len"], "gallery_length": config["sequence_len"], "fusion": None, **kw}
    return create_reranker("ames-dinov2-binary" if binarized else "ames-dinov2", checkpoint=checkpoint, config=official, **kw)


def all_pairs(reranker, queries, gallery):
    return np.stack([r.scores for r in reranker.rerank_many(queries, [gallery] * len(queries))])


@pytest.mark.golden("ames")
@pytest.mark.parametrize("attn", ["sdpa", "reference"])
@pytest.mark.parametrize("container", ["checkpoint.pt.xz", "weights.safetensors.xz"])
def test_logits_match_official(golden_case, container, attn, tmp_path):
    queries, gallery, _, outputs, config = load_case(golden_case, tmp_path)
    suffix = ".pt" if container.endswith(".pt.xz") else ".safetensors"
    reranker = ames(unxz(golden_case / container, tmp_path / f"w{suffix}"), config, batch_size=7, attn_implementation=attn)
    # evaluation: database tokens rounded to float16, as the official evaluation does
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["raw_eval"], atol=5e-4, rtol=0)
    # training mode skips the cast
    reranker.module.train()
    with torch.no_grad():
        q, g = reranker.pair_inputs(queries, np.repeat(np.arange(len(queries)), len(gallery)), gallery * len(queries))
        nocast = reranker.pair_logits(reranker.module, q, g).numpy().reshape(len(queries), len(gallery))
    np.testing.assert_allclose(nocast, outputs["raw_nocast"], atol=1e-4, rtol=0)


@pytest.mark.golden("ames")
@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_binarized_logits_match_official(golden_case, attn, tmp_path):
    from safetensors.torch import load, save_file

    queries, gallery, _, _, config = load_case(golden_case, tmp_path)
    folder = golden_case / "binarized"
    if not folder.is_dir():
        pytest.skip(f"{golden_case.name} has no binarized variant")
    full = load(lzma.decompress((golden_case / "weights.safetensors.xz").read_bytes()))
    delta = load(lzma.decompress((folder / "weights_delta.safetensors.xz").read_bytes()))
    keys = [k["key"] for k in json.loads((folder / "keys.json").read_text())]
    save_file({k: delta[k] if k in delta else full[k] for k in keys}, str(tmp_path / "binary.safetensors"))
    binary = {**config, **json.loads((folder / "config.json").read_text())}
    expected = np.load(folder / "outputs.npz")["raw_eval"]
    official = binary["constructor_kwargs"]
    for architecture in (official, {"nhead": official["nhead"], "activation": official["activation"]}):
        reranker = ames(tmp_path / "binary.safetensors", binary, architecture, attn_implementation=attn)
        assert {k: reranker.module.config[k] for k in official} == official
        np.testing.assert_allclose(all_pairs(reranker, queries, gallery), expected, atol=2e-4, rtol=0)


@pytest.mark.golden("ames")
def test_sizes_come_from_the_checkpoint(golden_case, tmp_path):
    """A bare official file and nothing but the number of heads and the activation (which no
    tensor shows): every other size is read from the tensors, and the logits are the official ones."""
    queries, gallery, _, outputs, config = load_case(golden_case, tmp_path)
    official = config["constructor_kwargs"]
    reranker = ames(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config,
                    {"nhead": official["nhead"], "activation": official["activation"]})
    assert {k: reranker.module.config[k] for k in official} == official
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["raw_eval"], atol=5e-4, rtol=0)


def push_down(inds, sims, junk):
    """The official junk push-down: items in ``junk`` move to the end, both parts keep their order."""
    is_junk = np.isin(inds, junk)
    order = np.r_[np.flatnonzero(~is_junk), np.flatnonzero(is_junk)]
    return inds[order], sims[order]


@pytest.mark.golden("ames")
def test_ensemble_and_junk_handling_match_official_ranks(golden_case, tmp_path):
    queries, gallery, inputs, outputs, config = load_case(golden_case, tmp_path)
    gnd = json.loads((golden_case / "gnd.json").read_text())["gnd"]
    reranker = ames(unxz(golden_case / "weights.safetensors.xz", tmp_path / "w.safetensors"), config)
    # (lambda, gamma) do not change the logits: score each distinct top-k window once
    score_pairs, cache = reranker.score_pairs, {}

    def score_once(queries, heads):
        key = tuple(id(item) for head in heads for item in head)
        if key not in cache:
            cache[key] = score_pairs(queries, heads)
        return cache[key]

    reranker.score_pairs = score_once
    for name, junk_of in [("medium", lambda g: g["junk"]), ("hard", lambda g: g["junk"] + g["easy"])]:
        shortlists = [push_down(inputs["nn_inds"][i], inputs["nn_sims"][i], junk_of(g)) for i, g in enumerate(gnd)]
        np.testing.assert_array_equal(np.stack([s[0] for s in shortlists]), outputs[f"{name}_nn_inds"])
        raw_sim = outputs[f"{name}_raw_sim"]
        grid = itertools.product(enumerate(inputs["top_k"]), enumerate(inputs["lamb"]), enumerate(inputs["temp"]))
        for (ki, k), (li, lamb), (ti, temp) in grid:
            # the ensemble formula, from the official raw logits
            ens = fuse_scores(np.stack([s[1] for s in shortlists])[:, :k], raw_sim[:, :k], lamb, temp)
            np.testing.assert_allclose(ens, outputs[f"{name}_ens_scores"][ki, li, ti, :, :k], atol=1e-6)
            # the whole re-ranking: model, ensemble, top-k window, tail kept in order
            reranker.fusion, reranker.top_k = (lamb, temp), int(k)
            results = reranker.rerank_many(
                queries, [[gallery[j] for j in inds] for inds, _ in shortlists], [sims for _, sims in shortlists]
            )
            ranks = np.stack([inds[r.order] for (inds, _), r in zip(shortlists, results)])
            np.testing.assert_array_equal(ranks, outputs[f"{name}_ranks"][ki, li, ti], err_msg=f"{name} k={k} λ={lamb} γ={temp}")


@pytest.mark.golden("ames")
def test_training_loss_is_bce_on_train_mode_logits(golden_case, tmp_path):
    queries, gallery, _, outputs, config = load_case(golden_case, tmp_path)
    reranker = ames(unxz(golden_case / "weights.safetensors.xz", tmp_path / "w.safetensors"), config)
    reranker.module.train()
    labels = [np.arange(len(gallery)) % (i + 2) == 0 for i in range(len(queries))]
    loss = reranker.training_loss(queries, [gallery] * len(queries), [l.astype(np.float32) for l in labels])
    x, y = outputs["raw_nocast"].astype(np.float64), np.stack(labels)
    assert loss.item() == pytest.approx(np.mean(np.logaddexp(0, x) - y * x), abs=1e-5)
    loss.backward()
    assert reranker.module.classifier.weight.grad.abs().sum() > 0


@pytest.mark.golden("ames")
def test_save_pretrained_round_trip(golden_case, tmp_path):
    queries, gallery, _, _, config = load_case(golden_case, tmp_path)
    reranker = ames(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config)
    reranker.save_pretrained(tmp_path / "saved")
    again = ames(tmp_path / "saved", config)
    np.testing.assert_array_equal(all_pairs(again, queries[:1], gallery), all_pairs(reranker, queries[:1], gallery))


def tiny(**kw):
    config = dict(local_dim=16, model_dim=8, nhead=2, num_encoder_layers=2, dim_feedforward=16)
    return create_reranker("ames-dinov2", pretrained=False, config=config, query_length=6, gallery_length=4, **kw)


def test_registered_names_and_defaults():
    from locore_plugin.adapters.ames import CONFIGS, FUSION

    assert FUSION == {
        "ames-dinov2": (0.55, 0.30), "ames-dinov2-binary": (0.35, 0.10), "ames-cvnet": (0.85, 0.80),
        "ames-cvnet-binary": (0.65, 0.20), "ames-768": (0.55, 0.30),
    }
    assert CONFIGS["ames-768"]["model_dim"] == 768 and CONFIGS["ames-cvnet"]["local_dim"] == 1024
    r = create_reranker("ames-dinov2", pretrained=False, config=dict(num_encoder_layers=1))
    assert (r.query_length, r.gallery_length, r.fusion) == (600, 50, (0.55, 0.30))
    assert sorted(k for k in r.module.state_dict() if "layers" not in k) == [
        "classifier.bias", "classifier.weight", "mtc_token",
        "remap_local.0.bias", "remap_local.0.weight", "remap_local.1.bias", "remap_local.1.weight",
    ]


def test_random_init_scores_and_trains():
    rng = np.random.default_rng(0)
    q = ImageFeatures(local=rng.normal(size=(9, 16)), global_desc=rng.normal(size=4))
    shortlist = [ImageFeatures(local=rng.normal(size=(n, 16)), global_desc=rng.normal(size=4)) for n in (1, 3, 7)]
    result = tiny().rerank(q, shortlist)
    assert sorted(result.order) == [0, 1, 2] and np.isfinite(result.scores).all()
    binary = create_reranker("ames-dinov2-binary", pretrained=False, fusion=None, query_length=6, gallery_length=4,
                             config=dict(local_dim=16, model_dim=8, num_encoder_layers=1))
    binary.module.train()
    loss = binary.training_loss([q], [shortlist], [np.array([1, 0, 1])])
    loss.backward()
    assert binary.module.remap_local[0].W.grad is not None  # erf keeps the binarisation trainable


def test_bad_inputs_are_clear_errors(tmp_path):
    rng = np.random.default_rng(1)
    q = ImageFeatures(local=rng.normal(size=(5, 16)))
    with pytest.raises(ValueError, match="dimension 12, but the model expects 16"):
        tiny(fusion=None).rerank(q, [ImageFeatures(local=rng.normal(size=(5, 12)))])
    with pytest.raises(ValueError, match="no valid local descriptors"):
        tiny(fusion=None).rerank(q, [ImageFeatures(local=np.ones((3, 16)), mask=np.zeros(3, bool))])
    with pytest.raises(ValueError, match="NaN"):
        ImageFeatures(local=np.full((3, 16), np.nan))
    with pytest.raises(ValueError, match="fusion"):
        tiny().rerank(q, [ImageFeatures(local=rng.normal(size=(5, 16)))])  # no globals to fuse with
    with pytest.raises(ValueError, match="checkpoint="):
        create_reranker("ames-dinov2")
    with pytest.raises(ValueError, match="unknown ames-.* config key"):
        create_reranker("ames-dinov2", pretrained=False, config={"hidden": 3})
    with pytest.raises(TypeError):
        create_reranker("ames-dinov2", pretrained=False, colour="red")
    with pytest.raises(FileNotFoundError):
        create_reranker("ames-dinov2", checkpoint=tmp_path / "absent.pt")


@pytest.mark.golden("ames")
def test_a_config_that_contradicts_the_checkpoint_names_the_keys(golden_case, tmp_path):
    _, _, _, _, config = load_case(golden_case, tmp_path)
    official = config["constructor_kwargs"]
    if official["binarized"]:
        pytest.skip("the case is binarised")
    checkpoint = unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt")
    dim, local = official["model_dim"], official["local_dim"]
    wider = {**official, "local_dim": local + 8}
    with pytest.raises(StateDictMismatchError, match=rf"remap_local\.0\.weight: checkpoint \({dim}, {local}\) vs model \({dim}, {local + 8}\)"):
        create_reranker("ames-dinov2", checkpoint=checkpoint, config=wider)
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(3\): remap_local\.0\.W, remap_local\.2\.bias"):
        create_reranker("ames-dinov2-binary", checkpoint=checkpoint, config={**official, "binarized": True})
    with pytest.raises(ValueError, match="full-precision AMES.*use ames-dinov2"):
        create_reranker("ames-dinov2-binary", checkpoint=checkpoint)  # the variant's name disagrees with the file


@pytest.mark.golden("ames")
@pytest.mark.parametrize("dtype, atol", [("fp16", 0.1), ("bf16", 0.5)])
def test_reduced_precision_stays_close(golden_case, dtype, atol, tmp_path):
    """Zero padding stays zero through the L2 normalisation in float16 (the official eps underflows there)."""
    queries, gallery, _, outputs, config = load_case(golden_case, tmp_path)
    reranker = ames(unxz(golden_case / "weights.safetensors.xz", tmp_path / "w.safetensors"), config, dtype=dtype)
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["raw_eval_f64"], atol=atol, rtol=0)


def test_trains_through_the_shared_loop_with_gradient_checkpointing(tmp_path):
    from locore_plugin.data.training_lists import TrainingLists
    from locore_plugin.training import TrainConfig, train

    rng = np.random.default_rng(0)
    features = [ImageFeatures(global_desc=rng.normal(size=4), local=rng.normal(size=(5, 16))) for _ in range(16)]
    neighbours = np.stack([np.roll(np.arange(16), -i)[:6] for i in range(16)])
    options = dict(config=dict(local_dim=16, model_dim=8, nhead=2, num_encoder_layers=2, dim_feedforward=16),
                   query_length=6, gallery_length=6, fusion=None)
    cfg = TrainConfig.from_dict(dict(
        reranker="ames-dinov2", reranker_options=options, output_dir=str(tmp_path / "run"), data={}, epochs=1,
        per_device_batch_size=4, grad_accumulation=1, lr=1e-2, save_every=0, progress=False, device="cpu",
        gradient_checkpointing=True,
    ))
    train(cfg, TrainingLists(features, neighbours, np.arange(16) % 4, list_length=5, seed=0))
    trained = create_reranker("ames-dinov2", checkpoint=tmp_path / "run" / "final", **options)
    torch.manual_seed(0)
    initial = create_reranker("ames-dinov2", pretrained=False, **options)
    assert not torch.equal(trained.module.classifier.weight, initial.module.classifier.weight)
    assert np.isfinite(trained.rerank(features[0], features[1:6]).scores).all()


# -- the binary variant's official training: ITQ initialisation and distillation -----------------


def test_fit_itq_is_an_orthonormal_rotation_of_the_pca_subspace_that_lowers_the_quantisation_error():
    from locore_plugin.adapters.ames import fit_itq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)) @ rng.normal(size=(24, 24))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    centred = unit - unit.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][:8].T  # independent PCA: the first 8 right singular vectors

    def error(w):
        v = centred @ w
        return float(((np.sign(v) - v) ** 2).sum())

    start, fitted = fit_itq(x, 8, iterations=0), fit_itq(x, 8)
    assert fitted.shape == (24, 8) and np.allclose(fitted.T @ fitted, np.eye(8), atol=1e-5)
    assert np.allclose(fitted @ fitted.T, top @ top.T, atol=1e-4)  # the same subspace, rotated
    assert error(fitted) < error(start)
    with pytest.raises(ValueError, match="bits"):
        fit_itq(x, 25)


def test_itq_initialises_the_binarisation_layer_from_official_files_or_from_descriptors(tmp_path):
    from locore_plugin.adapters.ames import fit_itq
    from locore_plugin.io.descriptors import write_descriptors

    rng = np.random.default_rng(2)
    config = dict(local_dim=16, model_dim=8, num_encoder_layers=1)
    projection = rng.normal(size=(16, 8)).astype(np.float32)
    np.savez(tmp_path / "itq_dinov2_D8.npz", proj=projection)  # the AMES layout
    torch.save({"W": torch.from_numpy(projection)}, tmp_path / "itq.pt")  # the ELViS layout
    for source in ("itq_dinov2_D8.npz", "itq.pt"):
        binary = create_reranker("ames-dinov2-binary", pretrained=False, config=config, itq=tmp_path / source)
        assert torch.equal(binary.module.remap_local[0].W.detach(), torch.from_numpy(projection))

    images = [ImageFeatures(local=rng.normal(size=(n, 16))) for n in (30, 12, 40)]
    write_descriptors(tmp_path, "d", "train", images, topk=40)
    binary = create_reranker("ames-dinov2-binary", pretrained=False, config=config, itq=tmp_path / "d_train_local.hdf5")
    valid = np.concatenate([f.local for f in images]).astype(np.float32)
    expected = fit_itq(valid[np.random.default_rng(0).permutation(len(valid))], 8)  # all 82 locals, any order: same PCA
    got = binary.module.remap_local[0].W.detach().numpy()
    assert np.allclose(got @ got.T, expected @ expected.T, atol=1e-4)

    with pytest.raises(ValueError, match=r"\(16, 8\)"):
        create_reranker("ames-dinov2-binary", pretrained=False, config={**config, "model_dim": 4, "nhead": 2}, itq=tmp_path / "itq.pt")
    with pytest.raises(ValueError, match="only the -binary variants"):
        create_reranker("ames-dinov2", pretrained=False, config=config, itq=tmp_path / "itq.pt")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        create_reranker("ames-dinov2-binary", pretrained=False, config=config, itq=tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", W=projection)
    with pytest.raises(KeyError, match="'proj'"):
        create_reranker("ames-dinov2-binary", pretrained=False, config=config, itq=tmp_path / "other.npz")


def _distillation_batch(rng):
    queries = [ImageFeatures(local=rng.normal(size=(n, 16))) for n in (9, 4)]
    shortlists = [[ImageFeatures(local=rng.normal(size=(n, 16))) for n in (2, 6, 5)] for _ in queries]
    return queries, shortlists, [np.array([1, 0, 1]), np.array([0, 1, 0])]


def test_distillation_compares_the_final_states_at_the_summary_token_and_the_locals_the_student_read():
    rng = np.random.default_rng(3)
    config = dict(local_dim=16, model_dim=8, nhead=2, num_encoder_layers=2, dim_feedforward=16)
    teacher = create_reranker("ames-dinov2", pretrained=False, config=config, query_length=8, gallery_length=6)
    student = create_reranker("ames-dinov2", pretrained=False, config=config, query_length=8, gallery_length=6)
    student.module.load_state_dict(teacher.module.state_dict())
    queries, shortlists, labels = _distillation_batch(rng)
    student.module.eval()  # the same forward as the teacher's (the eval-mode float16 database cast included)
    assert student.supports_distillation
    # an identical student reading every local: the distillation term is 0, the loss is the BCE alone
    student.rng, bce_rng = np.random.default_rng(5), np.random.default_rng(5)
    with_teacher = student.distillation_loss(queries, shortlists, labels, teacher, weight=10.0)
    student.rng = bce_rng
    assert torch.allclose(with_teacher, student.training_loss(queries, shortlists, labels), atol=1e-6)

    # the student reads 3 query / 2 gallery locals: by hand, against the teacher's states of all of them
    student.variable_locals = 2
    student.rng = np.random.default_rng(7)
    loss = student.distillation_loss(queries, shortlists, labels, teacher, weight=10.0)
    student.rng = np.random.default_rng(7)
    rows, items, target = student.sample_pairs(labels, student.rng)
    q_len, g_len = int(student.rng.integers(2, 8)), int(student.rng.integers(2, 6))
    pairs = [shortlists[r][i] for r, i in zip(rows, items)]
    student_inputs, teacher_inputs = student.pair_inputs(queries, rows, pairs, (q_len, g_len)), teacher.pair_inputs(queries, rows, pairs)
    with torch.no_grad():
        logits, mine = student.pair_tokens(student.module, *student_inputs)
        _, theirs = teacher.pair_tokens(teacher.module, *teacher_inputs)
    sq, tq = student_inputs[0]["mask"].shape[1], teacher_inputs[0]["mask"].shape[1]  # query slots of each
    terms = []
    for p, (r, item) in enumerate(zip(rows, pairs)):
        nq, ng = min(q_len, len(queries[r].local)), min(g_len, len(item.local))  # the valid locals the student read
        kept = [0, *range(1, 1 + nq)]
        student_rows = kept + list(range(1 + sq, 1 + sq + ng))
        teacher_rows = kept + list(range(1 + tq, 1 + tq + ng))
        terms.append(((mine[p, student_rows] - theirs[p, teacher_rows]) ** 2).mean(-1))
    distance = torch.cat(terms).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(target))
    assert distance > 0
    assert torch.allclose(loss, bce + 10.0 * distance, atol=1e-5)


def test_a_teacher_reading_fewer_locals_than_the_student_is_an_error():
    rng = np.random.default_rng(4)
    config = dict(local_dim=16, model_dim=8, nhead=2, num_encoder_layers=1, dim_feedforward=16)
    teacher = create_reranker("ames-dinov2", pretrained=False, config=config, query_length=3, gallery_length=6)
    student = create_reranker("ames-dinov2-binary", pretrained=False, config=config, query_length=8, gallery_length=6)
    with pytest.raises(ValueError, match="teacher reads fewer locals"):
        student.distillation_loss(*_distillation_batch(rng), teacher, weight=10.0)
