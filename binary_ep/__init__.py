"""binary_ep: everything the fully connected and the convolutional binary-weight EP networks share.

One module per job (imports point one way: this package knows no concrete network, no
``Tools_*`` module and not ``main.py``).  Importing the package imports nothing heavy:
``binary_ep.vocabulary`` (the command-line vocabulary) stays importable without torch.

* ``vocabulary``: data sets, activations, image sizes, conv geometry, ``UserError`` (no torch);
* ``activations``: the activations, the output nudge, one-hot targets;
* ``binary_optimizer``: the flip rule (``BinaryFlip``) and the scaling factors alpha;
* ``streams``: single-threaded CPU workers that relax shares of a batch side by side;
* ``network``: ``EPNetwork``, the relaxation and the phases on top of a network's ``stepper``;
* ``neurons``: the neuron models (rate, binary) and the integer counts of bits;
* ``events`` / ``activity``: binary neurons' event-driven counts and their activity statistics;
* ``signs``: the sign matrices of binary weights, kept between updates and patched at the flips;
* ``limits`` / ``memory``: the range of every numeric flag, and the memory a network needs;
* ``estimators``: gradient estimators behind one ``compute_gradient`` (EP variants, BPTT);
* ``gdu_check``: the EP-versus-BPTT gradient check (``--check gdu``);
* ``loops``: the training and test loops of one epoch;
* ``signals``: SIGINT/SIGTERM as ``Interrupted``, deferred while files are written;
* ``files``: atomic writes, write failures as one sentence, the run-folder lock;
* ``run_folder``: ``S-<n>`` folders, ``Hyperparameters.txt``, ``results.csv``;
* ``outcome``: how a run ends: its one line and exit code, the one clean-up allowed;
* ``checkpoint``: ``checkpoint.pt`` and the random number generators' states;
* ``datasets``: MNIST, Fashion-MNIST, CIFAR-10 (torchvision) and scikit-learn's digits;
* ``cpu_kernels``: compiled CPU kernels of the conv relaxation (C source beside its loader);
* ``distributed``: data-parallel training on torch.distributed (torchrun): shares, the gradient
  exchange, rank 0's outcomes, stopping together, lost ranks;
* ``heartbeat``: each rank's heartbeat in the launcher's store, naming lost ranks and ending a
  rank that a hung peer blocks;
* ``device``: the device of a run, why CUDA is unusable, float32 (no TF32) and cuDNN's
  deterministic algorithms;
* ``log_stream``: stdout/stderr that fall silent when their reader leaves, instead of ending
  the run;
* ``export`` / ``model_file`` / ``numpy_reference``: the 1-bit model file, its NumPy reader
  (every member, size and meta field checked against the format) and its NumPy golden model.
"""
