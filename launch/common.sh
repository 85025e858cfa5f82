# Sourced by launch/train_*.sh: find Python, then hand everything to the Python launcher (which counts GPUs,
# picks a port, runs the pre-flight estimate, prints and starts the ranks: forked on a CPU machine, else the
# torchrun/accelerate/deepspeed command).
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
ftl_launch() {
    local py
    py="$(ftl_python)" || exit 1
    PYTHONPATH="$FTL_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m finetune_launcher.launch "$@"
}
