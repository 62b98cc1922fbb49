"""Prompt classification tasks: readers, k-shot sampling, label-word loss and prediction vs references."""
import json

import pytest
import torch
import torch.nn.functional as F

from colafx.runtime import tasks

TASK = tasks.PromptTask("{text} Overall:", (" bad", " good"))


def _tsv(tmp_path, rows, name="d.tsv", header="text\tlabel"):
    path = tmp_path / name
    path.write_text(header + "\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    return path


def test_read_tsv_and_jsonl(tmp_path):
    exs = tasks.read_examples(_tsv(tmp_path, [("nice film", 1), ("dull", 0)]), TASK)
    assert exs == [tasks.Example({"text": "nice film"}, 1), tasks.Example({"text": "dull"}, 0)]
    named = tasks.PromptTask("{q}", (" no", " yes"), label_field="answer", label_names=("no", "yes"))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "a", "answer": "yes"}) + "\n\n" + json.dumps({"q": "b", "answer": 0}) + "\n")
    assert [e.label for e in tasks.read_examples(path, named)] == [1, 0]
    assert TASK.prompt(exs[0]) == "nice film Overall:"


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tasks.read_examples(tmp_path / "missing.tsv", TASK)
    with pytest.raises(ValueError, match="no 'label' column"):
        tasks.read_examples(_tsv(tmp_path, [("x", 1)], header="text\ty"), TASK)
    with pytest.raises(ValueError, match="outside"):
        tasks.read_examples(_tsv(tmp_path, [("x", 5)]), TASK)
    with pytest.raises(ValueError, match="neither an index"):
        tasks.read_examples(_tsv(tmp_path, [("x", "pos")]), TASK)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        tasks.read_examples(bad, TASK)
    with pytest.raises(ValueError, match="needs field"):
        tasks.PromptTask("{sentence}", (" a", " b")).prompt(tasks.Example({"text": "x"}, 0))


def test_sample_per_class():
    exs = [tasks.Example({"text": str(i)}, i % 2) for i in range(20)]
    a = tasks.sample_per_class(exs, 3, seed=1)
    assert sorted(e.label for e in a) == [0, 0, 0, 1, 1, 1]
    assert a == tasks.sample_per_class(exs, 3, seed=1) and a != tasks.sample_per_class(exs, 3, seed=2)
    assert len(tasks.sample_per_class(exs, 0, seed=1)) == 20
    with pytest.raises(ValueError, match="fewer than k=11"):
        tasks.sample_per_class(exs, 11)


def _reference_logprobs(model, tok, prompt, word):
    p, w = tok.encode(prompt), tok.encode(word, add_special_tokens=False)
    ids = torch.tensor([p + w])
    logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return torch.stack([logp[len(p) - 1 + i, t] for i, t in enumerate(w)])


def test_label_loss_and_predict_match_full_logits(tiny_model):
    tok = tasks.ByteTokenizer()  # label words are several byte tokens: exercises the mean log-prob
    exs = [tasks.Example({"text": "a fine, warm film"}, 1), tasks.Example({"text": "no"}, 0),
           tasks.Example({"text": "long and tedious to watch"}, 0)]
    with torch.no_grad():
        ref_loss = torch.stack([-_reference_logprobs(tiny_model, tok, TASK.prompt(e), TASK.label_words[e.label]).mean()
                                for e in exs]).mean()
        loss = tasks.label_loss(tiny_model, tok, TASK, exs)
        scores = torch.tensor([[_reference_logprobs(tiny_model, tok, TASK.prompt(e), w).mean() for w in TASK.label_words]
                               for e in exs])
        pred = tasks.predict(tiny_model, tok, TASK, exs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert pred.tolist() == scores.argmax(1).tolist()
    acc = tasks.accuracy(tiny_model, tok, TASK, exs, batch_size=2)
    assert acc == pytest.approx(sum(int(p == e.label) for p, e in zip(pred.tolist(), exs)) / 3)


@pytest.mark.parametrize("words", [(" bad", " good"), ("-", "+")], ids=["multi-token", "one-token"])
def test_candidates_objective_is_cross_entropy_over_label_word_scores(tiny_model, words):
    """objective="candidates": CE over the mean log-probs of the label words (both code paths)."""
    task = tasks.PromptTask("{text} Overall:", words)
    tok = tasks.ByteTokenizer()
    exs = [tasks.Example({"text": "a fine, warm film"}, 1), tasks.Example({"text": "no"}, 0),
           tasks.Example({"text": "long and tedious to watch"}, 1)]
    with torch.no_grad():
        scores = torch.stack([torch.stack([_reference_logprobs(tiny_model, tok, task.prompt(e), w).mean()
                                           for w in words]) for e in exs])
        ref = F.cross_entropy(scores, torch.tensor([e.label for e in exs]))
        loss = tasks.label_loss(tiny_model, tok, task, exs, objective="candidates")
        got_scores = tasks.candidate_scores(tiny_model, tok, task, exs)
    torch.testing.assert_close(got_scores.double(), scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown objective 'mse'"):
        tasks.label_loss(tiny_model, tok, task, exs, objective="mse")


def test_text_loss_matches_hf(tiny_model):
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tasks.text_loss(tiny_model, ids), tiny_model(input_ids=ids, labels=ids).loss)


def test_text_blocks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 10)
    blocks = tasks.read_text_blocks(path, tasks.ByteTokenizer(), 16)
    assert blocks.shape == (7, 16) and bytes(blocks[0].tolist()) == b"hello world hell"
    with pytest.raises(ValueError, match="fewer than one block"):
        tasks.read_text_blocks(path, tasks.ByteTokenizer(), 1000)


def test_glue_sst2_files(data_dir):
    dev = tasks.read_examples(data_dir / "SST-2" / "dev.tsv", tasks.SST2)
    assert len(dev) == 872 and {e.label for e in dev} == {0, 1}
    assert tasks.SST2.prompt(dev[0]) == "it 's a charming and often affecting journey . It was"
