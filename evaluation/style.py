"""Style / format flags of a reply, for illusory-forgetting drift: JSON, markdown, code fences."""
import json
import re


_FENCED_BLOCK_RE = re.compile(r"```[A-Za-z]*\s*\n(.*?)```", re.DOTALL)


def _is_json_container(s):
    try:
        return isinstance(json.loads(s), (dict, list))
    except json.JSONDecodeError:
        return False


def is_json_output(text):
    """The whole reply, or one of its fenced blocks, parses as a JSON object or list."""
    return _is_json_container(text.strip()) or any(
        _is_json_container(b.strip()) for b in _FENCED_BLOCK_RE.findall(text))


def has_code_fence(text):
    """A line that opens a ``` code fence."""
    return re.search(r"^\s*```", text, flags=re.MULTILINE) is not None


_MARKDOWN_RE = re.compile(
    r"^\s*```"  # code fence
    r"|^\s*#{1,6}\s"  # heading
    r"|^\s*[-*+]\s+\S"  # bullet
    r"|^\s*\d+[.)]\s+\S"  # numbered list
    r"|\*\*[^*\n]+\*\*",  # bold
    re.MULTILINE,
)


def has_markdown(text):
    """Code fence, `#` heading, bullet or numbered list line, or **bold**."""
    return _MARKDOWN_RE.search(text) is not None
