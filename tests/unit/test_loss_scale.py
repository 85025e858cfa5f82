"""fp16 runs record DeepSpeed's dynamic loss scale and the steps an overflow skipped (history records), read from the
engine without a device sync; other precisions record neither."""
from types import SimpleNamespace

from finetune_launcher.guards import fp16_loss_scale, fp16_skipped_step


def engine(fp16, scale=None, applied=True):
    return SimpleNamespace(fp16_enabled=lambda: fp16, optimizer=SimpleNamespace(cur_scale=scale),
                           was_step_applied=lambda: applied)


def test_fp16_engine_reports_its_loss_scale_and_skipped_steps():
    assert fp16_loss_scale(engine(True, 65536.0)) == 65536.0
    assert fp16_skipped_step(engine(True, 32768.0, applied=False))
    assert not fp16_skipped_step(engine(True, 32768.0, applied=True))


def test_other_precisions_report_no_loss_scale():
    assert fp16_loss_scale(engine(False, 1.0)) is None
    assert fp16_loss_scale(SimpleNamespace()) is None  # the ddp engine has no fp16 path
    assert not fp16_skipped_step(engine(False, applied=False))
