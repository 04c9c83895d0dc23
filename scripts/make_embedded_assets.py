"""Regenerate the embedded assets in builder/assets (sample chats, tokenizer, tiny target).

Everything is derived from the text in this file and fixed seeds, so a rerun
reproduces the committed files; the committed files remain the source of truth.

    .venv/bin/python scripts/make_embedded_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "builder" / "assets"
CHATS = ASSETS / "chats"
TEMPLATES = ASSETS / "templates"
TARGET = ASSETS / "tiny-llama"

SEED = 20240611
N_SHAREGPT = 150
N_OPENAI = 150
EMPTY_SYSTEM_ROWS = (17, 88)  # OpenAI rows with {"role": "system", "content": None}
VOCAB_SIZE = 1024
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
]

# ---------------------------------------------------------------------------
# Building blocks. Each topic: opening questions, follow-ups, and a pool of
# answer sentences; answers are seeded draws from the pool so lengths vary.
# ---------------------------------------------------------------------------

TOPICS: dict[str, dict] = {
    "python": {
        "qa": [
            (
                "How do I reverse a list in Python?",
                "You can call `items.reverse()` to reverse the list in place, or use `items[::-1]` to get a reversed copy.",
            ),
            (
                "What is the difference between a list and a tuple?",
                "A list is mutable, so you can append and remove items, while a tuple is fixed once created.",
            ),
            (
                "Why does my loop skip items when I remove them from the list?",
                "Removing items while iterating shifts the remaining elements, so the loop index jumps over the next one. "
                "Iterate over a copy, such as `for x in list(items):`, or build a new list with a comprehension instead.",
            ),
            (
                "How can I read a CSV file without pandas?",
                "The `csv` module in the standard library reads rows as lists, and `csv.DictReader` gives you "
                "dictionaries keyed by the header.",
            ),
            (
                "What does the `with` statement do when opening a file?",
                "The `with` statement closes the file for you, even when an exception is raised inside the block.",
            ),
            (
                "How do I sort a list of dictionaries by one key?",
                "Use `sorted(rows, key=lambda r: r['age'])`, and add `reverse=True` if you want the largest first.",
            ),
            (
                "Can you explain what a generator is?",
                "A generator produces values lazily with `yield`, so it never holds the whole sequence in memory.",
            ),
        ],
        "followups": [
            "Can you show a short example?",
            "Is that fast for a million items?",
            "What happens if the list is empty?",
            "Does this work in Python 3.8 too?",
        ],
        "extras": [
            "For example, `def squares(n): for i in range(n): yield i * i` returns one square at a time.",
            "Sorting is O(n log n), so a million items usually takes well under a second on a laptop.",
            "An empty list simply produces an empty result, and no exception is raised.",
            "All of these features have been available since Python 3.0, so older 3.x versions are fine.",
            "If you need the original order later, keep the input untouched and work on a copy.",
            "Type hints such as `list[int]` make the intent clearer but do not change runtime behaviour.",
            "A quick way to check is to try it in the interactive interpreter with a small list.",
            "The official documentation has a short tutorial section that covers this well.",
            "Tuples can be used as dictionary keys because they are hashable, but lists cannot.",
            "When in doubt, write a tiny test with `assert` so you know the behaviour is what you expect.",
        ],
    },
    "cooking": {
        "qa": [
            (
                "How long should I boil an egg for a soft yolk?",
                "Lower the eggs into boiling water and cook them for six and a half minutes, then cool them in ice water.",
            ),
            (
                "What can I use instead of buttermilk in pancakes?",
                "Mix one cup of milk with a tablespoon of lemon juice or vinegar and let it stand for five minutes.",
            ),
            (
                "Why does my bread come out dense?",
                "Dense bread usually means the dough was under-proofed or the flour had too little protein.",
            ),
            (
                "How do I keep rice from getting sticky?",
                "Rinse the rice until the water runs clear, which washes away the loose starch on the surface.",
            ),
            (
                "What is a simple weeknight pasta sauce?",
                "Soften garlic in olive oil, add a tin of crushed tomatoes, a pinch of salt and chili, and simmer for fifteen minutes.",
            ),
            (
                "How do I know when a steak is medium rare?",
                "A medium-rare steak reads about 55 degrees Celsius in the center, which is 130 degrees Fahrenheit.",
            ),
        ],
        "followups": [
            "What if I am cooking at high altitude?",
            "Can I make it vegan?",
            "How long does it keep in the fridge?",
            "Could you scale that for six people?",
        ],
        "extras": [
            "Let the dough rise until it has roughly doubled, and press it gently: it should spring back slowly.",
            "Use about one and a half cups of water per cup of long-grain rice, and let it rest covered after cooking.",
            "Finish the sauce with a splash of pasta water so it clings to the noodles.",
            "Rest the meat for five minutes so the juices settle before you slice it.",
            "At high altitude water boils at a lower temperature, so add a minute or two to the cooking time.",
            "Swap the butter for olive oil and the milk for oat milk, and the result is fully plant based.",
            "Most cooked dishes keep for three to four days in a sealed container in the fridge.",
            "For six people, multiply every quantity by one and a half and use a wider pan.",
            "Taste as you go, because tomatoes and salt vary a lot from one brand to another.",
            "A cheap kitchen thermometer takes most of the guesswork out of cooking meat and bread.",
        ],
    },
    "travel": {
        "qa": [
            (
                "What should I pack for a week in Lisbon in April?",
                "April in Lisbon is mild, around 18 degrees during the day, so pack light layers and a rain jacket. "
                "Bring comfortable shoes, because the city is hilly and many streets are paved with slippery stone.",
            ),
            (
                "How early should I arrive at the airport for an international flight?",
                "For international flights, arriving three hours before departure leaves time for check-in and security.",
            ),
            (
                "Is it better to take the train or fly from Paris to Lyon?",
                "The high-speed train takes about two hours from city center to city center, which usually beats flying.",
            ),
            ("How do I avoid jet lag when flying east?", "Shift your sleep an hour earlier each day for a few days before the trip."),
            (
                "What are some tips for traveling with only a carry-on?",
                "Roll your clothes, pick one color palette, and wear your bulkiest shoes on the plane.",
            ),
            (
                "How can I find cheap accommodation in Kyoto?",
                "Guesthouses and business hotels near the main station in Kyoto are often cheaper than the old town.",
            ),
        ],
        "followups": [
            "What about traveling with kids?",
            "Do I need a visa for that?",
            "How much cash should I bring?",
            "Is it safe to go alone?",
        ],
        "extras": [
            "Get outside in the morning light after you land, and avoid long naps on the first afternoon.",
            "Booking two or three months ahead usually gives the best prices, especially in cherry blossom season.",
            "Check the entry rules on the official government site, because visa requirements depend on your passport.",
            "Cards are accepted almost everywhere, but a small amount of local cash helps at markets and small cafés.",
            "Traveling alone is common there; keep copies of your documents and share your plans with a friend.",
            "With kids, plan one main activity per day and leave the afternoons flexible.",
            "Travel insurance is inexpensive compared with the cost of a missed connection or a lost bag.",
            "A reusable water bottle and a small power bank save money and stress on long travel days.",
            "Learning a few words such as hello, thank you and excuse me goes a long way.",
        ],
    },
    "math": {
        "qa": [
            ("What is 17 times 23?", "17 times 23 is 391, since 17 times 20 is 340 and 17 times 3 is 51."),
            (
                "How do I compute the area of a circle with radius 3?",
                "The area is pi times the radius squared, so for radius 3 it is 9 pi, about 28.27.",
            ),
            (
                "Can you explain what a prime number is?",
                "A prime number is a whole number greater than one whose only divisors are one and itself. "
                "The first primes are 2, 3, 5, 7, 11 and 13, and 2 is the only even prime.",
            ),
            ("How do I solve 2x + 5 = 13?", "Subtract 5 from both sides to get 2x = 8, then divide by 2, so x = 4."),
            ("What is the derivative of x squared?", "The derivative of x squared is 2x, which you can get from the power rule."),
            (
                "Why is any number to the power zero equal to one?",
                "Dividing x to the n by x to the n gives one, and the exponent rule says it equals x to the zero.",
            ),
            (
                "What is the probability of rolling two sixes with two dice?",
                "Each die shows a six with probability one sixth, so two sixes happen with probability 1/36.",
            ),
        ],
        "followups": [
            "Can you show the steps?",
            "How would I check the answer?",
            "Is there a faster way?",
            "What about negative numbers?",
        ],
        "extras": [
            "To check, substitute the value back into the original equation and confirm both sides match.",
            "A quicker route is to estimate first, so you notice if the exact answer is wildly off.",
            "Negative numbers follow the same rules, but keep track of the sign at every step.",
            "Writing each step on its own line makes small mistakes much easier to spot.",
            "The square root of 2 is irrational, so its decimal expansion never repeats.",
            "In general, the power rule says the derivative of x to the n is n times x to the n minus one.",
            "The one exception is zero to the power zero, which is usually defined as one by convention.",
            "Pi is roughly 3.14159, and 22/7 is a handy approximation for mental arithmetic.",
        ],
    },
    "history": {
        "qa": [
            (
                "Why was the printing press so important?",
                "The printing press made books far cheaper, so ideas spread faster than copyists could ever manage.",
            ),
            (
                "What caused the fall of the Western Roman Empire?",
                "Historians point to many causes, including economic strain, political instability and pressure on the borders.",
            ),
            (
                "Who built the first practical steam engine?",
                "Thomas Newcomen built a working steam engine in 1712, and James Watt later made it far more efficient.",
            ),
            (
                "What was the Silk Road?",
                "The Silk Road was a network of trade routes linking China with Central Asia, Persia and the Mediterranean.",
            ),
            (
                "Why did the Apollo program end?",
                "Apollo ended mainly because of its cost and shifting political priorities after the Moon landings.",
            ),
            (
                "How did ancient Egyptians build the pyramids?",
                "Workers quarried limestone blocks, moved them on sledges, and likely used ramps to raise them.",
            ),
        ],
        "followups": [
            "What happened next?",
            "Which sources do historians rely on for that?",
            "Was that the same everywhere in Europe?",
            "Can you summarize it in one sentence?",
        ],
        "extras": [
            "Within a few decades of Gutenberg's work, presses were running in more than two hundred European towns.",
            "Goods such as silk, spices and paper moved along it, but so did religions, languages and diseases.",
            "Recent finds suggest the builders were paid laborers who lived in organized villages nearby.",
            "Historians combine written records, archaeology and, more recently, scientific dating methods.",
            "The pace of change differed a lot from region to region, so broad summaries hide real variety.",
            "In one sentence: a new technology lowered the cost of sharing knowledge, and society reorganized around it.",
            "Later centuries reinterpreted these events, so it helps to read sources from the period itself.",
            "Museums and university libraries often publish digitized primary sources that anyone can read online.",
        ],
    },
    "writing": {
        "qa": [
            (
                "Can you help me make this sentence shorter: 'In order to be able to finish the report, we need more time.'",
                "A shorter version is: 'We need more time to finish the report.'",
            ),
            (
                "How do I write a polite email asking for a deadline extension?",
                "Start by thanking the reader, state the new date you are asking for, and give one clear reason.",
            ),
            (
                "What makes a good opening line for a short story?",
                "A good opening line raises a question in the reader's mind, or drops them into a moment of tension.",
            ),
            (
                "Should I use the passive voice in a scientific paper?",
                "Passive voice is acceptable when the actor does not matter, but active voice is usually clearer.",
            ),
            (
                "How do I structure a five-paragraph essay?",
                "Use an introduction with a thesis, three body paragraphs that each support one point, and a conclusion.",
            ),
            (
                "Can you suggest a title for a blog post about home gardening?",
                "How about 'Small Plot, Big Harvest: Notes From a Backyard Garden'?",
            ),
        ],
        "followups": [
            "Can you make it more formal?",
            "Could you give me two alternatives?",
            "Is that too long?",
            "How would you end it?",
        ],
        "extras": [
            "Offer what you will deliver by the original date, so the request feels like a plan rather than a delay.",
            "Another option is 'Dirt Under My Nails', which is shorter and more personal.",
            "To make it more formal, replace contractions and use complete sentences throughout.",
            "End with a single sentence that restates your request and thanks the reader again.",
            "Read the draft aloud: sentences that make you stumble usually need to be cut or split.",
            "Keep paragraphs to one idea each, and let the first sentence say what that idea is.",
            "Specific details, such as a name or a number, make writing more vivid than general claims.",
            "Cutting filler words like 'really', 'very' and 'in order to' tightens most sentences.",
        ],
    },
    "science": {
        "qa": [
            ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters much more than red light."),
            (
                "How do vaccines train the immune system?",
                "A vaccine shows the immune system a harmless piece or version of a germ, so it learns to recognize it.",
            ),
            (
                "What is the difference between weather and climate?",
                "Weather is what happens on a given day, while climate is the average pattern over many years.",
            ),
            (
                "Why does ice float on water?",
                "Water expands when it freezes into a crystal lattice, so ice is less dense than liquid water.",
            ),
            (
                "How does a refrigerator keep things cold?",
                "A refrigerator pumps heat out of the box by evaporating a refrigerant inside and condensing it outside.",
            ),
        ],
        "followups": [
            "Can you explain it to a ten-year-old?",
            "Is there an experiment I can do at home?",
            "Why is that?",
        ],
        "extras": [
            "At sunset the light travels through more air, so most of the blue is scattered away and reds remain.",
            "Think of it like sweat cooling your skin: evaporation carries heat away.",
            "Put a glass of water in the freezer and mark the level, then check how much it rises once frozen.",
            "Scientists test ideas by making predictions and checking whether measurements agree with them.",
            "Simple explanations are a starting point, and the full story usually involves a bit more physics.",
            "The same idea shows up in many places once you know to look for it, from cooking to the weather.",
        ],
    },
}

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few sentences as possible.",
    "You are a friendly tutor who explains things step by step.",
    "You are an expert software engineer. Prefer short code examples.",
    "You are a travel agent who gives practical, budget-conscious advice.",
    "Always answer politely and admit when you are not sure.",
    "You are a cooking assistant. Use metric units.",
    "You are a writing coach. Keep feedback kind and specific.",
]

GENERIC_FOLLOWUPS = [
    "Thanks! Can you say more?",
    "Could you explain that differently?",
    "Why?",
    "Great, anything else I should know?",
    "Can you summarize that?",
    "OK, and what would you do?",
]

SHORT_REPLIES = [
    "Sure.",
    "Yes, that works.",
    "You're welcome!",
    "Happy to help.",
    "No, that is not quite right.",
]

# A tool call: the assistant announces it, the tool answers, the assistant uses it.
TOOL_EXCHANGES = [
    (
        "What is the weather in Oslo right now?",
        "Let me look up the current weather in Oslo.",
        '{"city": "Oslo", "temp_c": 4, "conditions": "light snow"}',
        "It is 4 degrees Celsius in Oslo with light snow, so dress warmly.",
    ),
    (
        "Convert 72 degrees Fahrenheit to Celsius.",
        "I will use the unit converter.",
        '{"input": "72 F", "output": "22.2 C"}',
        "72 degrees Fahrenheit is about 22.2 degrees Celsius.",
    ),
    (
        "What is 4821 divided by 7?",
        "Calling the calculator.",
        '{"expression": "4821 / 7", "result": 688.7142857}',
        "4821 divided by 7 is about 688.71.",
    ),
    (
        "Find the opening hours of the city library.",
        "Searching the library website.",
        '{"monday_friday": "09:00-20:00", "saturday": "10:00-16:00", "sunday": "closed"}',
        "The library opens 9 to 20 on weekdays, 10 to 16 on Saturday, and is closed on Sunday.",
    ),
    (
        "How many days until the 31st of December?",
        "Let me check today's date.",
        '{"today": "2024-06-11", "days_until": 203}',
        "There are 203 days left until the 31st of December.",
    ),
]


def elaborate(rng: random.Random, topic: dict, lead: str, long: bool) -> str:
    """A lead sentence plus 0-7 extras from the topic's pool (1-8 sentences in all)."""
    pool = [s for s in topic["extras"] if s != lead]
    k = rng.randint(4, 7) if long else rng.choice([0, 0, 1, 1, 2, 3])
    return " ".join([lead] + rng.sample(pool, min(k, len(pool))))


def compose(rng: random.Random) -> list[tuple[str, str]]:
    """One conversation as (neutral role, text) pairs; roles: system/user/assistant/tool."""
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.4:
        turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
    long_chat = rng.random() < 0.07  # long chats push some samples past 512 tokens
    n_exchanges = rng.randint(3, 4) if long_chat else rng.choice([1, 1, 2, 2, 3, 4])
    use_tool = rng.random() < 0.07
    for i in range(n_exchanges):
        long = long_chat or rng.random() < 0.1
        if i == 0 and use_tool:
            question, call, result, reply = rng.choice(TOOL_EXCHANGES)
            turns += [("user", question), ("assistant", call), ("tool", result), ("assistant", reply)]
        elif i == 0:
            question, lead = rng.choice(topic["qa"])
            turns += [("user", question), ("assistant", elaborate(rng, topic, lead, long))]
        else:
            turns.append(("user", rng.choice(topic["followups"] + GENERIC_FOLLOWUPS)))
            if rng.random() < 0.1:
                turns.append(("assistant", rng.choice(SHORT_REPLIES)))
            else:
                lead = rng.choice(topic["extras"])
                turns.append(("assistant", elaborate(rng, topic, lead, long)))
    return turns


SHAREGPT_ROLES = {
    "system": ["system"],
    "user": ["human"] * 4 + ["user"],
    "assistant": ["gpt"] * 5 + ["assistant", "chatgpt", "bot", "model"],
    "tool": ["tool"],
}


def to_sharegpt(rng: random.Random, idx: int, turns: list[tuple[str, str]]) -> dict:
    # Pick one spelling per role per conversation, as real ShareGPT dumps do.
    names = {role: rng.choice(options) for role, options in SHAREGPT_ROLES.items()}
    return {
        "id": f"sg-{idx:03d}",
        "conversations": [{"from": names[role], "value": text} for role, text in turns],
    }


def to_openai(rng: random.Random, idx: int, turns: list[tuple[str, str]], empty_system: bool) -> dict:
    parts = rng.random() < 0.1  # content as a list of text parts
    messages = []
    if empty_system:
        messages.append({"role": "system", "content": None})
    for role, text in turns:
        if parts:
            pieces = text.split(". ")
            content = [{"type": "text", "text": p + (". " if i < len(pieces) - 1 else "")} for i, p in enumerate(pieces)]
        else:
            content = text
        messages.append({"role": role, "content": content})
    return {"id": f"oa-{idx:03d}", "messages": messages}


def make_chats(rng: random.Random) -> tuple[list[dict], list[dict]]:
    sharegpt = [to_sharegpt(rng, i, compose(rng)) for i in range(N_SHAREGPT)]
    openai = []
    for i in range(N_OPENAI):
        turns = compose(rng)
        empty_system = i in EMPTY_SYSTEM_ROWS
        if empty_system:  # the empty prompt replaces any real one
            turns = [t for t in turns if t[0] != "system"]
        openai.append(to_openai(rng, i, turns, empty_system))
    return sharegpt, openai


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def all_texts(sharegpt: list[dict], openai: list[dict]) -> list[str]:
    texts = [m["value"] for row in sharegpt for m in row["conversations"]]
    for row in openai:
        for m in row["messages"]:
            c = m["content"]
            if isinstance(c, list):
                texts.append("".join(p["text"] for p in c))
            elif c:
                texts.append(c)
    return texts


# ---------------------------------------------------------------------------
# Chat template. Written with explicit whitespace control because transformers
# renders with trim_blocks/lstrip_blocks: a literal newline after a block tag
# would silently disappear.
# ---------------------------------------------------------------------------

WITH_GENERATION = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|assistant|>\\n' }}
        {%- generation %}
            {{- message['content'] ~ '<|end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- endif %}
"""

NO_GENERATION = WITH_GENERATION.replace("        {%- generation %}\n", "").replace("        {%- endgeneration %}\n", "")


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps exact character offsets, which the assistant mask relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=4096,
        chat_template=WITH_GENERATION,
    )


def init_weights(model, seed: int) -> None:
    """Seeded normal(0.02) matrices, then a wider embedding (0.05) so each token's
    identity survives the shared direction the random layers add, and a wide lm_head
    (0.5) so the softmax is peaked: ~450 distinct argmax tokens on the sample chats."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        embed = model.get_input_embeddings().weight
        embed.copy_(torch.randn(embed.shape, generator=gen) * 0.05)
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=gen) * 0.5)


def build_target(tokenizer, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    init_weights(model, seed=0)
    model.save_pretrained(out)


def main() -> None:
    rng = random.Random(SEED)
    sharegpt, openai = make_chats(rng)
    write_jsonl(CHATS / "sharegpt.jsonl", sharegpt)
    write_jsonl(CHATS / "openai.jsonl", openai)

    TEMPLATES.mkdir(parents=True, exist_ok=True)
    (TEMPLATES / "with_generation.jinja").write_text(WITH_GENERATION, encoding="utf-8")
    (TEMPLATES / "no_generation.jinja").write_text(NO_GENERATION, encoding="utf-8")

    tokenizer = wrap_tokenizer(train_tokenizer(all_texts(sharegpt, openai)))
    TARGET.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(TARGET)
    build_target(tokenizer, TARGET)
    print(f"wrote {len(sharegpt)} ShareGPT + {len(openai)} OpenAI chats, vocab {len(tokenizer)}, target in {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
