"""Runtime-test helpers."""
import pytest

from colafx.runtime import pretrain as P


@pytest.fixture
def interrupted_train(monkeypatch):
    """``run(config, step)``: a ``P.train(config)`` that is interrupted (KeyboardInterrupt) when it
    reaches 0-based ``step``; the real training step is restored afterwards."""
    def run(config, step):
        real = P._train_step

        def crash(model, optimizer, blocks, cfg, s, *rest):
            if s == step:
                raise KeyboardInterrupt
            return real(model, optimizer, blocks, cfg, s, *rest)

        monkeypatch.setattr(P, "_train_step", crash)
        with pytest.raises(KeyboardInterrupt):
            P.train(config)
        monkeypatch.setattr(P, "_train_step", real)
    return run
