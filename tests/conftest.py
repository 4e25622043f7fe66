import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny models: one thread avoids oversubscription on small CPUs (2 cores in CI).
torch.set_num_threads(1)
