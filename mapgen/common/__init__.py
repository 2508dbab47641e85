"""Pure, torch-free pieces that the compiler, the runtime and verification all use: errors, input
limits, the model dims, and the facts about HF names and tensor layouts that both a build and a
running conversion need."""
