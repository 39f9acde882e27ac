"""Test-wide settings: one torch thread.

The models under test are small: one thread is faster than several contending for the same
cores, and two xdist workers then share two cores evenly. Results do not depend on it.
"""

import torch

torch.set_num_threads(1)
