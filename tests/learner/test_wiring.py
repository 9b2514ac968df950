"""What the driver hands the learner stays light to unpickle: Ray Train's controller unpickles `train_loop_config`
too, and a controller that imports torch's models and transformers for it spends ~6-7 s of CPU per run."""

import subprocess
import sys
from pathlib import Path


def test_the_learner_wiring_unpickles_without_torch_or_transformers():
    code = ("import pickle, sys; from learner.wiring import LearnerWiring; "
            "w = LearnerWiring(config={}, model_path='m', buffer=None, actors=[], reports=None, checkpoint_root='c'); "
            "blob = pickle.dumps(w); del sys.modules['learner.wiring'], sys.modules['learner']; pickle.loads(blob); "
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
