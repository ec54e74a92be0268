"""C++ kernels for what tensor operations do poorly on the CPU, built with the machine's compiler on first use."""
