//! Just enough of the POSIX shell to find the `decodebench` command lines in the Slurm script, the
//! Dockerfile's RUN lines, a container's `sh -c` script and the shell blocks of the docs, and to
//! expand them as `sh` would: quotes, backslash-newline, `$VAR`, `${VAR:-default}` and the other
//! parameter operators, `$(...)`, field splitting of unquoted expansions, `;` `&` `&&` `|`,
//! redirections (dropped), here-documents (skipped), `for NAME in ...` (first value) and
//! `bash -c 'script'` (evaluated in turn, seeing only exported variables).
//!
//! Nothing is run. A command substitution becomes a plausible output of its command; a variable
//! that was never set expands to nothing, as in `sh`, and is recorded so that a `decodebench`
//! command line using one can be reported instead of silently losing an argument.

use std::collections::{BTreeMap, BTreeSet};

pub type Env = BTreeMap<String, String>;

/// One simple command after expansion.
#[derive(Debug, Clone)]
pub struct SimpleCommand {
    /// The words after the prefix assignments, redirections removed.
    pub argv: Vec<String>,
    /// `NAME=value` words before the command: its own environment.
    pub assignments: Vec<(String, String)>,
    /// 1-based line of the command's first word in the text given to [`evaluate`].
    pub line: usize,
    /// Variables expanded while unset (to nothing).
    pub unset: Vec<String>,
    /// "bash -c" when this command ran inside a `bash -c` / `sh -c` script of another command.
    pub nested_in: Option<String>,
}

/// Evaluates `script` with the exported environment `env` and returns every simple command, in
/// order, including those of nested `bash -c` scripts (right after the command that runs them).
pub fn evaluate(script: &str, env: &Env) -> Result<Vec<SimpleCommand>, String> {
    let tokens = Lexer::new(script).run()?;
    let mut shell = Shell {
        vars: env.clone(),
        exported: env.keys().cloned().collect(),
        out: Vec::new(),
    };
    shell.run(&tokens)?;
    Ok(shell.out)
}

/// The words of a command with the wrappers that only start it taken off: leading assignments,
/// `exec`, `nohup`, `time`, `env [NAME=value...]`, the reserved words that can open a command
/// (`do`, `then`, `!`, ...), and launchers whose options come first (`srun`, `apptainer exec`,
/// `singularity exec`: the program is the first word named `decodebench`, `bash` or `sh`).
pub fn strip_wrappers(argv: &[String]) -> &[String] {
    let mut rest = argv;
    loop {
        let Some(first) = rest.first() else {
            return rest;
        };
        match first.as_str() {
            "exec" | "nohup" | "time" | "command" | "!" | "do" | "then" | "else" | "elif"
            | "if" | "while" | "until" | "{" => rest = &rest[1..],
            "env" => {
                rest = &rest[1..];
                while rest
                    .first()
                    .is_some_and(|w| w.starts_with('-') || assignment_name(w).is_some())
                {
                    rest = &rest[1..];
                }
            }
            "srun" | "apptainer" | "singularity" => {
                match rest
                    .iter()
                    .position(|w| matches!(basename(w), "decodebench" | "bash" | "sh"))
                {
                    Some(i) => rest = &rest[i..],
                    None => return rest,
                }
            }
            w if assignment_name(w).is_some() => rest = &rest[1..],
            _ => return rest,
        }
    }
}

/// The last `/`-separated component of a word.
pub fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

/// `NAME` when `word` has the shape of an assignment `NAME=value`.
pub fn assignment_name(word: &str) -> Option<&str> {
    let (name, _) = word.split_once('=')?;
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then_some(name)
}

/// What a command substitution prints, for the commands the deployment files use; anything else
/// prints `x`. The values only have to be plausible where they land (a host name in a URL, a
/// folder name, a revision).
fn plausible_output(command: &str) -> String {
    let first = command.split_whitespace().next().unwrap_or("");
    match basename(first) {
        "hostname" | "scontrol" => "gpu001".into(),
        "date" => "20260102T023000Z".into(),
        "git" => "0123456789abcdef0123456789abcdef01234567".into(),
        "dpkg-query" => "13.0.88-1".into(),
        _ => "x".into(),
    }
}

#[derive(Debug, Clone)]
enum Part {
    /// Literal text; `quoted` when it came from quotes or a backslash (it keeps empty fields).
    Lit { text: String, quoted: bool },
    /// `$NAME`, `${NAME}` or `${NAME<op><word>}`.
    Param {
        name: String,
        op: Option<(String, String)>,
        quoted: bool,
    },
    /// `$(...)` or a backquoted command.
    Subst { command: String, quoted: bool },
    /// `$((...))`.
    Arith { quoted: bool },
}

#[derive(Debug, Clone)]
enum Token {
    Word {
        parts: Vec<Part>,
        line: usize,
    },
    /// `;`, `&`, `&&`, `||`, `|`, `(`, `)`, a newline: ends a simple command.
    Separator,
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    tokens: Vec<Token>,
    /// Here-documents whose bodies start after the next newline: (delimiter, strip tabs).
    pending_heredocs: Vec<(String, bool)>,
}

impl Lexer {
    fn new(text: &str) -> Lexer {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            tokens: Vec::new(),
            pending_heredocs: Vec::new(),
        }
    }

    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn err(&self, what: &str) -> String {
        format!("line {}: {what}", self.line)
    }

    fn run(mut self) -> Result<Vec<Token>, String> {
        while let Some(c) = self.peek(0) {
            match c {
                ' ' | '\t' | '\r' => self.pos += 1,
                '\n' => {
                    self.pos += 1;
                    self.line += 1;
                    self.tokens.push(Token::Separator);
                    self.skip_heredoc_bodies()?;
                }
                '\\' if self.peek(1) == Some('\n') => {
                    self.pos += 2;
                    self.line += 1;
                }
                '#' => {
                    while self.peek(0).is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                ';' | '|' | '(' | ')' => {
                    self.pos += 1;
                    if self.peek(0) == Some(c) && c != '(' && c != ')' {
                        self.pos += 1;
                    }
                    self.tokens.push(Token::Separator);
                }
                '&' if self.peek(1) == Some('>') => {
                    self.pos += 1;
                    self.redirection()?;
                }
                '&' => {
                    self.pos += 1;
                    if self.peek(0) == Some('&') {
                        self.pos += 1;
                    }
                    self.tokens.push(Token::Separator);
                }
                '<' | '>' => self.redirection()?,
                _ => {
                    let line = self.line;
                    let parts = self.word()?;
                    // `2>file`, `3<>file`: digits right before a redirection name a descriptor.
                    let fd = matches!(self.peek(0), Some('<' | '>'))
                        && matches!(parts.as_slice(), [Part::Lit { text, quoted: false }]
                            if text.chars().all(|c| c.is_ascii_digit()));
                    if fd {
                        self.redirection()?;
                    } else {
                        self.tokens.push(Token::Word { parts, line });
                    }
                }
            }
        }
        if !self.pending_heredocs.is_empty() {
            return Err(self.err("a here-document is not closed"));
        }
        Ok(self.tokens)
    }

    /// A redirection operator and its target word, both dropped (a here-document's body is
    /// skipped at the next newline).
    fn redirection(&mut self) -> Result<(), String> {
        let start = self.pos;
        while matches!(self.peek(0), Some('<' | '>' | '&' | '|' | '-')) {
            self.pos += 1;
        }
        let op: String = self.chars[start..self.pos].iter().collect();
        while matches!(self.peek(0), Some(' ' | '\t')) {
            self.pos += 1;
        }
        let target = self.word()?;
        if target.is_empty() {
            return Err(self.err(&format!("`{op}` without a target")));
        }
        if op.starts_with("<<") && !op.starts_with("<<<") {
            let delimiter: String = target
                .iter()
                .map(|p| match p {
                    Part::Lit { text, .. } => text.clone(),
                    _ => String::new(),
                })
                .collect();
            self.pending_heredocs.push((delimiter, op.ends_with('-')));
        }
        Ok(())
    }

    fn skip_heredoc_bodies(&mut self) -> Result<(), String> {
        for (delimiter, strip_tabs) in std::mem::take(&mut self.pending_heredocs) {
            loop {
                if self.pos >= self.chars.len() {
                    return Err(self.err(&format!("here-document `{delimiter}` is not closed")));
                }
                let start = self.pos;
                while self.peek(0).is_some_and(|c| c != '\n') {
                    self.pos += 1;
                }
                let text: String = self.chars[start..self.pos].iter().collect();
                self.pos += 1;
                self.line += 1;
                let text = if strip_tabs {
                    text.trim_start_matches('\t')
                } else {
                    &text
                };
                if text == delimiter {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One word, up to an unquoted blank or operator character.
    fn word(&mut self) -> Result<Vec<Part>, String> {
        self.word_until(true)
    }

    /// A word; with `blanks_end_it` false, the whole remaining text is one word (the operand of
    /// `${NAME:-word}`, where blanks are part of the value).
    fn word_until(&mut self, blanks_end_it: bool) -> Result<Vec<Part>, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let flush = |lit: &mut String, parts: &mut Vec<Part>| {
            if !lit.is_empty() {
                parts.push(Part::Lit {
                    text: std::mem::take(lit),
                    quoted: false,
                });
            }
        };
        while let Some(c) = self.peek(0) {
            match c {
                ' ' | '\t' | '\r' | '\n' | ';' | '&' | '|' | '(' | ')' | '<' | '>'
                    if blanks_end_it =>
                {
                    break
                }
                '\\' => {
                    match self.peek(1) {
                        Some('\n') => self.line += 1,
                        Some(next) => {
                            flush(&mut lit, &mut parts);
                            parts.push(Part::Lit {
                                text: next.to_string(),
                                quoted: true,
                            });
                        }
                        None => {}
                    }
                    self.pos += 2;
                }
                '\'' => {
                    flush(&mut lit, &mut parts);
                    self.pos += 1;
                    let start = self.pos;
                    while self.peek(0).is_some_and(|c| c != '\'') {
                        if self.peek(0) == Some('\n') {
                            self.line += 1;
                        }
                        self.pos += 1;
                    }
                    if self.peek(0).is_none() {
                        return Err(self.err("a single quote is not closed"));
                    }
                    let text = self.chars[start..self.pos].iter().collect();
                    self.pos += 1;
                    parts.push(Part::Lit { text, quoted: true });
                }
                '"' => {
                    flush(&mut lit, &mut parts);
                    self.pos += 1;
                    self.double_quoted(&mut parts)?;
                }
                '$' | '`' => {
                    let Some(part) = self.expansion(false)? else {
                        lit.push('$');
                        self.pos += 1;
                        continue;
                    };
                    flush(&mut lit, &mut parts);
                    parts.push(part);
                }
                _ => {
                    lit.push(c);
                    self.pos += 1;
                }
            }
        }
        flush(&mut lit, &mut parts);
        Ok(parts)
    }

    fn double_quoted(&mut self, parts: &mut Vec<Part>) -> Result<(), String> {
        // An empty "" is still a (quoted, empty) part: it keeps an empty argument.
        let mut lit = String::new();
        loop {
            let Some(c) = self.peek(0) else {
                return Err(self.err("a double quote is not closed"));
            };
            match c {
                '"' => {
                    self.pos += 1;
                    break;
                }
                '\\' => {
                    match self.peek(1) {
                        Some('\n') => self.line += 1,
                        Some(next @ ('$' | '`' | '"' | '\\')) => lit.push(next),
                        Some(next) => {
                            lit.push('\\');
                            lit.push(next);
                        }
                        None => return Err(self.err("a double quote is not closed")),
                    }
                    self.pos += 2;
                }
                '$' | '`' => match self.expansion(true)? {
                    Some(part) => {
                        parts.push(Part::Lit {
                            text: std::mem::take(&mut lit),
                            quoted: true,
                        });
                        parts.push(part);
                    }
                    None => {
                        lit.push('$');
                        self.pos += 1;
                    }
                },
                _ => {
                    if c == '\n' {
                        self.line += 1;
                    }
                    lit.push(c);
                    self.pos += 1;
                }
            }
        }
        parts.push(Part::Lit {
            text: lit,
            quoted: true,
        });
        Ok(())
    }

    /// An expansion at `$` or a backquote; None for a `$` that starts none (a literal `$`).
    fn expansion(&mut self, quoted: bool) -> Result<Option<Part>, String> {
        if self.peek(0) == Some('`') {
            self.pos += 1;
            let start = self.pos;
            while self.peek(0).is_some_and(|c| c != '`') {
                self.pos += 1;
            }
            if self.peek(0).is_none() {
                return Err(self.err("a backquote is not closed"));
            }
            let command = self.chars[start..self.pos].iter().collect();
            self.pos += 1;
            return Ok(Some(Part::Subst { command, quoted }));
        }
        match self.peek(1) {
            Some('(') if self.peek(2) == Some('(') => {
                self.pos += 1;
                self.balanced('(', ')')?;
                Ok(Some(Part::Arith { quoted }))
            }
            Some('(') => {
                self.pos += 1;
                let inner = self.balanced('(', ')')?;
                Ok(Some(Part::Subst {
                    command: inner,
                    quoted,
                }))
            }
            Some('{') => {
                self.pos += 1;
                let inner = self.balanced('{', '}')?;
                let name_len = if inner.starts_with(['#', '?', '!', '$', '@', '*', '-']) {
                    1
                } else {
                    inner
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(inner.len())
                };
                let (name, rest) = inner.split_at(name_len);
                if name.is_empty() || (name == "#" && !rest.is_empty()) {
                    return Err(self.err(&format!("`${{{inner}}}` is not modelled")));
                }
                let op = if rest.is_empty() {
                    None
                } else {
                    let op_len = if rest.starts_with(':') { 2 } else { 1 };
                    let (op, word) = rest.split_at(op_len.min(rest.len()));
                    if !matches!(op, ":-" | "-" | ":=" | "=" | ":?" | "?" | ":+" | "+") {
                        return Err(self.err(&format!(
                            "`${{{inner}}}`: the operator `{op}` is not modelled by this test"
                        )));
                    }
                    Some((op.to_string(), word.to_string()))
                };
                Ok(Some(Part::Param {
                    name: name.to_string(),
                    op,
                    quoted,
                }))
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                self.pos += 1;
                let start = self.pos;
                while self
                    .peek(0)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.pos += 1;
                }
                let name = self.chars[start..self.pos].iter().collect();
                Ok(Some(Part::Param {
                    name,
                    op: None,
                    quoted,
                }))
            }
            Some(c) if "?!$#@*-0123456789".contains(c) => {
                self.pos += 2;
                Ok(Some(Part::Param {
                    name: c.to_string(),
                    op: None,
                    quoted,
                }))
            }
            _ => Ok(None),
        }
    }

    /// With `pos` at `open`, the text up to its matching `close` (quotes respected); `pos` ends
    /// past `close`.
    fn balanced(&mut self, open: char, close: char) -> Result<String, String> {
        let start_line = self.line;
        self.pos += 1;
        let start = self.pos;
        let mut depth = 1;
        while let Some(c) = self.peek(0) {
            match c {
                '\\' => self.pos += 1,
                '\'' => {
                    self.pos += 1;
                    while self.peek(0).is_some_and(|c| c != '\'') {
                        self.pos += 1;
                    }
                }
                '"' => {
                    self.pos += 1;
                    while self.peek(0).is_some_and(|c| c != '"') {
                        if self.peek(0) == Some('\\') {
                            self.pos += 1;
                        }
                        self.pos += 1;
                    }
                }
                '\n' => self.line += 1,
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        let inner = self.chars[start..self.pos].iter().collect();
                        self.pos += 1;
                        return Ok(inner);
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
        Err(format!("line {start_line}: `{open}` is not closed"))
    }
}

struct Shell {
    vars: Env,
    exported: BTreeSet<String>,
    out: Vec<SimpleCommand>,
}

/// A word after expansion: its fields, and the variables it found unset.
struct Expanded {
    fields: Vec<String>,
    unset: Vec<String>,
}

impl Shell {
    fn run(&mut self, tokens: &[Token]) -> Result<(), String> {
        for command in tokens.split(|t| matches!(t, Token::Separator)) {
            let words: Vec<(&[Part], usize)> = command
                .iter()
                .filter_map(|t| match t {
                    Token::Word { parts, line } => Some((parts.as_slice(), *line)),
                    Token::Separator => None,
                })
                .collect();
            if let Some(&(_, line)) = words.first() {
                self.command(&words, line)?;
            }
        }
        Ok(())
    }

    fn command(&mut self, words: &[(&[Part], usize)], line: usize) -> Result<(), String> {
        let at = |e: String| format!("line {line}: {e}");
        let mut assignments = Vec::new();
        let mut rest = words;
        while let Some(((parts, _), tail)) = rest.split_first() {
            let Some((name, value)) = self.assignment(parts).map_err(at)? else {
                break;
            };
            assignments.push((name, value));
            rest = tail;
        }
        let mut argv = Vec::new();
        // Where each field came from, for a nested script's line numbers.
        let mut field_lines = Vec::new();
        let mut unset = Vec::new();
        for &(parts, word_line) in rest {
            let e = self.expand(parts, true).map_err(at)?;
            field_lines.extend(std::iter::repeat_n(word_line, e.fields.len()));
            argv.extend(e.fields);
            unset.extend(e.unset);
        }
        if argv.is_empty() {
            // Assignments alone set shell variables.
            self.vars.extend(assignments);
            return Ok(());
        }
        match argv[0].as_str() {
            "export" | "readonly" | "local" | "declare" => {
                for &(parts, _) in &rest[1..] {
                    if let Some((name, value)) = self.assignment(parts).map_err(at)? {
                        self.exported.insert(name.clone());
                        self.vars.insert(name, value);
                    } else if argv[0] == "export" {
                        let e = self.expand(parts, false).map_err(at)?;
                        self.exported.extend(e.fields);
                    }
                }
            }
            "unset" => {
                for name in &argv[1..] {
                    self.vars.remove(name);
                }
            }
            // One iteration is enough to see the loop body's command lines.
            "for" if argv.get(2).map(String::as_str) == Some("in") => {
                if let Some(first) = argv.get(3) {
                    self.vars.insert(argv[1].clone(), first.clone());
                }
            }
            _ => {}
        }
        let stripped = strip_wrappers(&argv);
        let nested = match stripped {
            // `-c`, or `-c` among single-letter options (`-ec`, `-lc`).
            [shell, flag, script, ..]
                if matches!(basename(shell), "bash" | "sh")
                    && flag.starts_with('-')
                    && !flag.starts_with("--")
                    && flag.ends_with('c') =>
            {
                let script_line = field_lines[argv.len() - stripped.len() + 2];
                Some((
                    format!("{} -c", basename(shell)),
                    script.clone(),
                    script_line,
                ))
            }
            _ => None,
        };
        self.out.push(SimpleCommand {
            argv,
            assignments: assignments.clone(),
            line,
            unset,
            nested_in: None,
        });
        if let Some((via, script, script_line)) = nested {
            // The script sees the exported variables and the command's own assignments only.
            let mut env: Env = self
                .vars
                .iter()
                .filter(|(k, _)| self.exported.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            env.extend(assignments);
            let inner = evaluate(&script, &env).map_err(|e| format!("in `{via}` at {e}"))?;
            self.out.extend(inner.into_iter().map(|mut c| {
                c.line += script_line - 1;
                c.nested_in = Some(via.clone());
                c
            }));
        }
        Ok(())
    }

    /// `NAME=value` (an unquoted name and `=` at the start of the word), expanded without field
    /// splitting, as the shell does.
    fn assignment(&mut self, parts: &[Part]) -> Result<Option<(String, String)>, String> {
        let Some(Part::Lit {
            text,
            quoted: false,
        }) = parts.first()
        else {
            return Ok(None);
        };
        let Some(name) = assignment_name(text) else {
            return Ok(None);
        };
        let mut value_parts = vec![Part::Lit {
            text: text[name.len() + 1..].to_string(),
            quoted: true,
        }];
        value_parts.extend_from_slice(&parts[1..]);
        let e = self.expand(&value_parts, false)?;
        Ok(Some((name.to_string(), e.fields.join(" "))))
    }

    fn expand(&mut self, parts: &[Part], split: bool) -> Result<Expanded, String> {
        let mut fields = Vec::new();
        let mut unset = Vec::new();
        let mut current = String::new();
        // Whether `current` is a field even when empty (quotes were seen).
        let mut have = false;
        for part in parts {
            let (text, quoted) = match part {
                Part::Lit { text, quoted } => {
                    current.push_str(text);
                    have |= *quoted || !text.is_empty();
                    continue;
                }
                Part::Param { name, op, quoted } => {
                    (self.parameter(name, op.as_ref(), &mut unset)?, *quoted)
                }
                Part::Subst { command, quoted } => (plausible_output(command), *quoted),
                Part::Arith { quoted } => ("0".to_string(), *quoted),
            };
            if quoted || !split {
                current.push_str(&text);
                have |= quoted;
                continue;
            }
            let pieces: Vec<&str> = text.split_whitespace().collect();
            if pieces.is_empty() {
                if !text.is_empty() && have {
                    fields.push(std::mem::take(&mut current));
                    have = false;
                }
                continue;
            }
            if text.starts_with(char::is_whitespace) && have {
                fields.push(std::mem::take(&mut current));
            }
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    fields.push(std::mem::take(&mut current));
                }
                current.push_str(piece);
            }
            have = true;
            if text.ends_with(char::is_whitespace) {
                fields.push(std::mem::take(&mut current));
                have = false;
            }
        }
        if have {
            fields.push(current);
        }
        Ok(Expanded { fields, unset })
    }

    fn parameter(
        &mut self,
        name: &str,
        op: Option<&(String, String)>,
        unset: &mut Vec<String>,
    ) -> Result<String, String> {
        let value = match name {
            "?" | "#" => Some("0".to_string()),
            "!" | "$" => Some("4242".to_string()),
            "0" => Some("sh".to_string()),
            "@" | "*" | "-" => Some(String::new()),
            _ => self.vars.get(name).cloned(),
        };
        let Some((op, word)) = op else {
            return Ok(value.unwrap_or_else(|| {
                unset.push(name.to_string());
                String::new()
            }));
        };
        let is_set = match op.as_str() {
            ":-" | ":=" | ":?" | ":+" => value.as_deref().is_some_and(|v| !v.is_empty()),
            _ => value.is_some(),
        };
        Ok(match (op.trim_start_matches(':'), is_set) {
            ("-", true) | ("=", true) | ("?", true) => value.unwrap_or_default(),
            ("-", false) => self.operand(word, unset)?,
            ("=", false) => {
                let w = self.operand(word, unset)?;
                self.vars.insert(name.to_string(), w.clone());
                w
            }
            ("?", false) => return Err(format!("${{{name}{op}{word}}}: {name} is not set")),
            ("+", true) => self.operand(word, unset)?,
            ("+", false) => String::new(),
            _ => unreachable!("operators are checked by the lexer"),
        })
    }

    /// The word of `${NAME:-word}` and the like, expanded (without field splitting: the
    /// expansion as a whole is split, or not, where it stands).
    fn operand(&mut self, word: &str, unset: &mut Vec<String>) -> Result<String, String> {
        let parts = Lexer::new(word).word_until(false)?;
        let e = self.expand(&parts, false)?;
        unset.extend(e.unset);
        Ok(e.fields.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argvs(script: &str, env: &[(&str, &str)]) -> Vec<Vec<String>> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        evaluate(script, &env)
            .unwrap()
            .into_iter()
            .map(|c| c.argv)
            .collect()
    }

    #[test]
    fn quotes_continuations_and_operators() {
        let got = argvs(
            "a 'b c' \"d $X\"e \\\n  f # comment\n\
             g 2>/dev/null >&2 | h &\n\
             i <<'EOF'\nnot a command\nEOF\nj",
            &[("X", "x y")],
        );
        assert_eq!(
            got,
            vec![
                vec!["a", "b c", "d x ye", "f"],
                vec!["g"],
                vec!["h"],
                vec!["i"],
                vec!["j"],
            ]
        );
    }

    #[test]
    fn parameters_split_unless_quoted_and_defaults_expand() {
        let got = argvs(
            "A=${A:---preset seed}\nB=${B:-$HOME/x}\ncmd $A \"$A\" $B ${C:+c} \"\" $UNSET",
            &[("HOME", "/h")],
        );
        assert_eq!(
            got,
            vec![vec!["cmd", "--preset", "seed", "--preset seed", "/h/x", ""]],
            "an unquoted empty expansion is no argument; \"\" is an empty one"
        );
        let cmds = evaluate("cmd $UNSET", &Env::new()).unwrap();
        assert_eq!(cmds[0].unset, vec!["UNSET"]);
        let err = evaluate("N=${N:?run it with sbatch}", &Env::new()).unwrap_err();
        assert!(err.contains("N is not set"), "{err}");
    }

    #[test]
    fn nested_scripts_see_exported_variables_only() {
        let script = "LOCAL=l\n\
                      srun --ntasks=2 bash -c 'exec decodebench agent \\\n  \
                      --name \"'\"$LOCAL\"'\" $HOME $LOCAL'";
        let cmds = evaluate(script, &[("HOME".into(), "/h".into())].into()).unwrap();
        let inner = cmds.last().unwrap();
        assert_eq!(inner.nested_in.as_deref(), Some("bash -c"));
        assert_eq!(
            inner.argv,
            vec!["exec", "decodebench", "agent", "--name", "l", "/h"]
        );
        assert_eq!(inner.unset, vec!["LOCAL"]);
        assert_eq!(inner.line, 2);
        assert_eq!(
            strip_wrappers(&inner.argv),
            &inner.argv[1..],
            "exec is only a launcher"
        );
    }

    #[test]
    fn for_loops_take_their_first_value() {
        let got = argvs("for i in 0 1; do echo cpu$i & done", &[]);
        assert_eq!(got[1], vec!["do", "echo", "cpu0"]);
    }
}
