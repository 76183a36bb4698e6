"""Progress output: redrawn on a terminal, a line every LOG_INTERVAL seconds in a log."""
import io
import time

from locore_plugin import progress as progress_module
from locore_plugin.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(stream):
    return [line for line in stream.getvalue().replace("\r", "\n").splitlines() if line.strip()]


def test_a_log_gets_the_end_line_and_not_every_update():
    from tqdm.auto import tqdm

    plain, log = io.StringIO(), io.StringIO()
    for bar in (tqdm(range(40), file=plain), progress(range(40), desc="work", file=log)):
        for _ in bar:
            time.sleep(0.01)  # 0.4 s: a plain bar redraws every 0.1 s
    assert len(_lines(plain)) >= 4
    assert len(_lines(log)) == 2 and "40/40" in _lines(log)[-1]


def test_a_terminal_redraws_as_usual(monkeypatch):
    bar = progress(range(3), file=Terminal())
    assert bar.mininterval < progress_module.LOG_INTERVAL
    assert progress(range(3), file=io.StringIO()).mininterval == progress_module.LOG_INTERVAL


def test_the_training_bar_in_a_log_is_not_redrawn_per_step(tmp_path, capsys):
    """The trainer's postfix (loss, lr) must not force a redraw on every step."""
    import numpy as np

    from locore_plugin import ImageFeatures
    from locore_plugin.data.training_lists import TrainingLists
    from locore_plugin.training import TrainConfig, train

    rng = np.random.default_rng(0)
    features = [ImageFeatures(global_desc=rng.normal(size=4), local=rng.normal(size=(5, 8))) for _ in range(40)]
    neighbours = np.stack([np.roll(np.arange(40), -i)[:6] for i in range(40)])
    config = TrainConfig.from_dict(dict(
        reranker="ames-dinov2", output_dir=str(tmp_path / "run"), data={}, epochs=1, per_device_batch_size=1,
        lr=1e-3, save_every=0, progress=True, device="cpu",
        reranker_options=dict(config=dict(local_dim=8, model_dim=8, nhead=2, num_encoder_layers=1, dim_feedforward=8),
                              query_length=5, gallery_length=5, fusion=None),
    ))
    train(config, TrainingLists(features, neighbours, np.arange(40) % 4, list_length=5))
    lines = _lines(io.StringIO(capsys.readouterr().err))
    assert 1 <= len([line for line in lines if line.startswith("train ames-dinov2")]) <= 3
