"""A stand-in for heretic / abliterix in tests: prints their notebook-mode transcript (progress lines,
the front menu, the save menus) and answers like them through input(). On "save" it copies the model
directory named by FAKE_TOOL_MODEL, with FAKE_TOOL_EDIT's tensor scaled by 0.5. FAKE_TOOL_FAIL=1 dies in
trial 1 the way heretic died on the MoE organism."""

import os
import shutil
import sys

from safetensors.torch import load_file, save_file

model, edit = os.environ["FAKE_TOOL_MODEL"], os.environ["FAKE_TOOL_EDIT"]
print("Loading model " + model + "...")
print("* Abliterable components:")
print("  * attn.o_proj: 2 modules total")
print("  * mlp.down_proj: 2 modules total")
print("Calculating refusal directions...")
trials = [(1, 3, 4, 0.25), (2, 1, 4, 0.5)]
for index, _, _, _ in trials:
    print()
    print(f"Running trial {index} of {len(trials)}...")
    print("* Abliterating...")
    if os.environ.get("FAKE_TOOL_FAIL"):
        print("Traceback (most recent call last):")
        print("AttributeError: 'Linear' object has no attribute 'base_layer'")
        sys.exit(1)
    print("Elapsed time: 1s")


def select(message, choices):
    print()
    print(message)
    for i, c in enumerate(choices, 1):
        print(f"[{i}] {c}")
    return choices[int(input("Enter number: ")) - 1]


print()
print("Optimization finished!")
while True:
    titles = [f"[Trial {i:>3}] Refusals: {r:>2}/{t}, KL divergence: {kl:.4f}" for i, r, t, kl in trials]
    picked = select("Which trial do you want to use?", titles + ["Run additional trials", "Exit program"])
    if picked == "Exit program":
        break
    while True:
        action = select("What do you want to do with the decensored model?",
                        ["Save the model to a local folder", "Upload the model to Hugging Face",
                         "Chat with the model", "Return to the trial selection menu"])
        if action.startswith("Return"):
            break
        print()
        folder = input("Path to the folder:: ")
        shutil.copytree(model, folder)
        tensors = load_file(os.path.join(folder, "model.safetensors"))
        tensors[edit] = tensors[edit] * 0.5
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        print(f"Model saved to {folder}.")
