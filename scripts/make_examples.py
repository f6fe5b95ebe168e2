"""Write the bundled example images and the few-shot demo (src/flamingo_vlm/examples/).

Scenes come from the synthetic generator's *test* split (seed 0) and binding names from the
held-out evaluation names, so the built-in model never saw any of them in training.
    python scripts/make_examples.py
"""

import json
from pathlib import Path

from flamingo_vlm.synthetic import SceneGenerator, binding_episode, binding_text
from flamingo_vlm.synthetic.scenes import NUMBER_WORDS

# Demonstrations end at their chunk's end; `flamingo-vlm generate --demo` adds the model's demo_separator
# after it (the built-in model's "\n", as in its training and evaluation; "" for OpenFlamingo's checkpoints).
END = "<|endofchunk|>"
OUT = Path(__file__).resolve().parents[1] / "src" / "flamingo_vlm" / "examples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gen = SceneGenerator(seed=0)
    files = {}

    def save(scene, name):
        scene.render(224).save(OUT / name, optimize=True)
        files[name] = scene.to_dict()
        return name

    s = [gen.scene(i, "test") for i in range(40)]
    # captioning: scenes with 1-2 objects keep the demo short
    cap = [x for x in s if len(x.objects) <= 2][:3]
    caption_items = []
    for k, scene in enumerate(cap[:2]):
        caption_items += [("image", save(scene, f"scene{k + 1}.png")), ("text", f"Output:{scene.captions(5)[0]}" + END)]
    caption_items += [("image", save(cap[2], "scene3.png")), ("text", "Output:")]
    # VQA on other scenes
    vqa = [x for x in s if x not in cap][:3]
    vqa_items = []
    qs = [[q for q in x.questions() if q["question_type"] in ("what color is the", "how many", "what shape is the")] for x in vqa]
    for k in range(2):
        q = qs[k][0]
        vqa_items += [("image", save(vqa[k], f"scene{k + 4}.png")),
                      ("text", f"Question:{q['question']} Short answer:{q['answer']}" + END)]
    q = qs[2][0]
    vqa_items += [("image", save(vqa[2], "scene6.png")), ("text", f"Question:{q['question']} Short answer:")]
    # name binding: 2 ways, 2 shots, held-out names
    ep = binding_episode(gen, 7, ways=2, shots=2, split="test")
    bind_items = []
    for k, (scene, name) in enumerate(ep.demos):
        bind_items += [("image", save(scene, f"object{k + 1}.png")), ("text", binding_text(name) + END)]
    bind_items += [("image", save(ep.query, "object3.png")), ("text", binding_text())]
    # counting answered in words, in a framing and phrasing of the user's own: only the demos say so
    # (the training templates answer counts in digits after "Short answer:")
    want = [2, 1, 3, 4, 3]
    pool = [gen.scene(i, "test") for i in range(40, 120)]
    picked = []
    for n in want:
        picked.append(next(x for x in pool if len(x.objects) == n and not x.text and x not in picked))
    question = "How many figures appear in the image?"
    count_items = []
    for k, (scene, n) in enumerate(zip(picked[:-1], want[:-1])):
        count_items += [("image", save(scene, f"count{k + 1}.png")),
                        ("text", f"Q: {question} A: {NUMBER_WORDS[n]}" + END)]
    count_items += [("image", save(picked[-1], "count5.png")), ("text", f"Q: {question} A:")]
    tasks = [
        {"title": "Captioning, 2 shots", "items": caption_items, "expected": cap[2].captions(5)[0], "max_new_tokens": 40},
        {"title": "Visual question answering, 2 shots", "items": vqa_items, "expected": q["answer"], "max_new_tokens": 8},
        {"title": "Made-up names bound in context (2-way, 2 shots)", "items": bind_items, "expected": ep.answer,
         "max_new_tokens": 8, "candidates": list(ep.names)},
        {"title": "Counting in words, as the demonstrations answer (4 shots)", "items": count_items,
         "expected": NUMBER_WORDS[want[-1]], "max_new_tokens": 6},
    ]
    (OUT / "demo.json").write_text(json.dumps({"tasks": tasks, "scenes": files}, indent=1) + "\n")
    print(f"wrote {len(files)} images and demo.json to {OUT}")


if __name__ == "__main__":
    main()
