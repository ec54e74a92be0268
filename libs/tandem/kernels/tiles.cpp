// The operator packing a weight for the tiles of tiles.h: see tiles.py.

#include <torch/library.h>

#include "tiles.h"

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("pack", &tandem::pack); }
