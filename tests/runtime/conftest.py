"""Runtime-test helpers."""
import pytest

from colafx.runtime import data as D
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


@pytest.fixture(scope="module")
def docs():
    """60 English documents (pydoc help topics): the small corpus of the data tests."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:60]]


@pytest.fixture(scope="module")
def tokenizer_dir(docs, tmp_path_factory):
    """A 512-token byte-level BPE trained on :func:`docs`, saved to a folder."""
    folder = tmp_path_factory.mktemp("tok")
    D.train_tokenizer(docs, 512).save_pretrained(folder)
    return str(folder)
