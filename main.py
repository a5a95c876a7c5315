"""AlignProp: fine-tune a text-to-image diffusion model by backpropagating a differentiable reward.

accelerate launch main.py --config config/align_prop.py:aesthetic
accelerate launch main.py --config config/align_prop.py:aesthetic --config.resume_from=logs/RUN
accelerate launch main.py --config config/align_prop.py:evaluate --config.resume_from=logs/RUN
python main.py --config config/align_prop.py:evaluate_soup --config.resume_from=logs/A --config.resume_from_2=logs/B
python main.py --config config/align_prop.py:tiny          # CPU demo, no downloads
python main.py --help                                      # the presets, one line each

The command line lives in alignprop/cli.py (also `python -m alignprop`).
"""

from alignprop.cli import main

if __name__ == "__main__":
    main()
