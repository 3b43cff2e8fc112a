"""The kernel's specification and lowering: the escnn MLP (:class:`ImplicitKernel`) and the lowered
program every implementation evaluates (:class:`KernelProgram`), and their pickling. Imports the op layer, no
implementation."""
