"""Lightning training, TensorBoard monitoring and the command line for covmodules."""
