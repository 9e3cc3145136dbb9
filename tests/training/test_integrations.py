"""The same ELSA run inside the Hugging Face Trainer and Lightning: levels, frozen bits, served file, resume."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import elsa_codec as ec
from elsa_codec import ELSAConfig, ELSAError
from elsa_codec.format.bits import bits_view

sys.path.insert(0, os.path.dirname(__file__))
import elsa_resume_job as job  # noqa: E402

torch.set_num_threads(1)
CFG = dict(levels=[0.75, 0.5], steps=6, densify_steps=4, final_steps=4, seed=0)  # 20 steps


def _same_bits(a, b):
    return torch.equal(bits_view(a.detach().contiguous()), bits_view(b.detach().contiguous()))


def _check_levels(res, model, snaps):
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.02)
    sd = dict(model.named_parameters())
    for t in (1, 2):
        for n, c in res.counters.items():
            frozen = c <= t
            assert _same_bits(sd[n][frozen], snaps[t][n][frozen]), (n, t)


# ------------------------------------------------------------------ Hugging Face Trainer
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 10), generator=g)
        self.labels = (self.ids[:, 1] > 32).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": self.labels[i]}


class _Crash(Exception):
    pass


def _trainer(out, cb, *, max_steps, extra=()):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=2e-3, warmup_steps=2, lr_scheduler_type="linear", logging_steps=5,
                             save_steps=8, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    return Trainer(model=_bert(), args=args, train_dataset=_Data(), callbacks=[cb, *extra])


def test_hf_trainer_callback_full_run(tmp_path):
    from elsa_codec.training.integrations.transformers import ELSATrainerCallback

    snaps = {}
    cb = ELSATrainerCallback(ELSAConfig(**CFG),
                             on_freeze=lambda t, m: snaps.setdefault(t, copy.deepcopy(dict(m.named_parameters()))))
    trainer = _trainer(tmp_path, cb, max_steps=20)
    trainer.train()
    assert cb.embedder.step == 20 and cb.embedder.done
    _check_levels(cb.result, trainer.model, snaps)
    logged = [h for h in trainer.state.log_history if "elsa_sparsity" in h]
    assert [h["elsa_phase"] for h in logged[:2]] == [0, 2] and logged[-1]["elsa_level"] == 3  # done: dense
    assert os.path.exists(tmp_path / "checkpoint-8" / "elsa_state.pt")
    enc = ec.load_file(cb.path)
    served = ec.load(cb.path, _bert().eval())
    plain = _bert().eval()
    x = _Data()[0:4]
    with torch.no_grad():
        for t in (1, 2, 3):
            ec.set_level(served, t)
            plain.load_state_dict(ec.extract(enc, t))
            torch.testing.assert_close(served(input_ids=x["input_ids"]).logits, plain(input_ids=x["input_ids"]).logits,
                                       rtol=1e-5, atol=1e-5)


def test_hf_trainer_max_steps_must_match(tmp_path):
    from elsa_codec.training.integrations.transformers import ELSATrainerCallback

    trainer = _trainer(tmp_path, ELSATrainerCallback(ELSAConfig(**CFG)), max_steps=15)
    with pytest.raises(ELSAError, match="max_steps=15 .* total_steps=20"):
        trainer.train()


def test_hf_trainer_resume_from_checkpoint(tmp_path):
    from transformers import TrainerCallback

    from elsa_codec.training.integrations.transformers import ELSATrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 9:
                raise _Crash()

    ref = ELSATrainerCallback(ELSAConfig(**CFG))
    _trainer(tmp_path / "ref", ref, max_steps=20).train()
    with pytest.raises(_Crash):
        _trainer(tmp_path / "run", ELSATrainerCallback(ELSAConfig(**CFG)), max_steps=20, extra=[CrashAfter()]).train()
    cb = ELSATrainerCallback(ELSAConfig(**CFG))
    _trainer(tmp_path / "run", cb, max_steps=20).train(resume_from_checkpoint=True)
    assert cb.embedder.history[0]["steps_done"] == 6 and cb.embedder.step == 20
    for n, c in ref.result.counters.items():
        assert torch.equal(c, cb.result.counters[n]), n
    assert cb.result.sparsities == ref.result.sparsities


def test_hf_trainer_distills_toward_the_original(tmp_path):
    from elsa_codec.training.integrations.transformers import ELSATrainerCallback

    snaps = {}
    cb = ELSATrainerCallback(ELSAConfig(**CFG, distill=ec.DistillConfig(temperature=2.0)),
                             on_freeze=lambda t, m: snaps.setdefault(t, copy.deepcopy(dict(m.named_parameters()))))
    trainer = _trainer(tmp_path, cb, max_steps=20)
    original = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    _check_levels(cb.result, trainer.model, snaps)
    hooks = cb.embedder._distill_hooks
    assert hooks.last is not None and float(hooks.last) > 0 and not trainer.model._forward_hooks
    saved = torch.load(tmp_path / "checkpoint-8" / "elsa_state.pt", weights_only=True)["teacher"]
    for n, p in original.items():
        assert torch.equal(saved[n], p), n


# ------------------------------------------------------------------ Lightning
L = pytest.importorskip("lightning.pytorch")


class _LitMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = job.MLP()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)


def _loader():
    x, y = job.data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:80], y[:80]), batch_size=8)  # 10 steps/epoch


def _lit_trainer(root, cb, extra=(), checkpointing=False):
    return L.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=checkpointing,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
                     default_root_dir=str(root), callbacks=[cb, *extra])


def test_lightning_callback_full_run_and_resume(tmp_path):
    from elsa_codec.training.integrations.lightning import ELSALightningCallback

    snaps = {}
    x, _ = job.data()
    cb = ELSALightningCallback(ELSAConfig(**CFG), bn_calibration=[x[:64]],
                               on_freeze=lambda t, m: snaps.setdefault(t, copy.deepcopy(dict(m.named_parameters()))))
    module = _LitMLP()
    trainer = _lit_trainer(tmp_path / "ref", cb)
    trainer.fit(module, _loader())
    assert cb.embedder.step == 20 and "elsa_sparsity" in trainer.callback_metrics
    _check_levels(cb.result, module, snaps)
    enc = ec.load_file(cb.path)
    served, plain = ec.load(cb.path, _LitMLP()).eval(), _LitMLP().eval()
    for t in (1, 2, 3):
        ec.set_level(served, t)
        plain.load_state_dict(ec.extract(enc, t))
        with torch.no_grad():
            torch.testing.assert_close(served(x), plain(x), rtol=1e-5, atol=1e-6)

    class CrashAfter10(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == 10:
                raise _Crash()

    saver = L.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    with pytest.raises(_Crash):
        _lit_trainer(tmp_path / "run", ELSALightningCallback(ELSAConfig(**CFG), bn_calibration=[x[:64]]),
                     [saver, CrashAfter10()], checkpointing=True).fit(_LitMLP(), _loader())
    (ckpt,) = [str(p) for p in (tmp_path / "ckpt").iterdir()]
    assert "elsa" in torch.load(ckpt, weights_only=False)
    again = ELSALightningCallback(ELSAConfig(**CFG), bn_calibration=[x[:64]])
    _lit_trainer(tmp_path / "run", again).fit(_LitMLP(), _loader(), ckpt_path=ckpt)
    assert again.embedder.step == 20
    for n, c in cb.result.counters.items():
        assert torch.equal(c, again.result.counters[n]), n


def test_lightning_callback_distills_toward_the_original(tmp_path):
    from elsa_codec.training.integrations.lightning import ELSALightningCallback

    snaps = {}
    x, _ = job.data()
    cb = ELSALightningCallback(ELSAConfig(**CFG, distill=ec.DistillConfig()), bn_calibration=[x[:64]],
                               on_freeze=lambda t, m: snaps.setdefault(t, copy.deepcopy(dict(m.named_parameters()))))
    module = _LitMLP()
    _lit_trainer(tmp_path, cb).fit(module, _loader())
    _check_levels(cb.result, module, snaps)
    assert cb.embedder._distill_hooks.last is not None and not module._forward_hooks
