/* The default prompt set of xprec fidelity: short user turns from the domains a shared FP8 base
 * hosts adapters for (biomedicine, law, physics, code) and general ones. */
#ifndef XP_FIDELITY_PROMPTS_H
#define XP_FIDELITY_PROMPTS_H

static const char *const xp_fidelity_default_prompts[] = {
    "What does the BRCA1 gene do, and why do its mutations matter?",
    "Summarize how CRISPR-Cas9 edits a genome.",
    "Which drug classes treat hypertension, and how do they differ?",
    "Explain the difference between a cohort study and a randomized controlled trial.",
    "What is the doctrine of precedent in common law?",
    "Draft a one-sentence confidentiality clause for a research agreement.",
    "Explain why the sky is blue.",
    "What is the uncertainty principle?",
    "Derive the kinetic energy of a particle from Newton's second law.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does FP8 E4M3 mean in machine learning?",
    "Translate to German: The weather is nice today.",
    "List three uses of the Fourier transform.",
    "How does a transformer language model generate text?",
    "Give a short definition of entropy in information theory.",
    "Why do HPC centres share GPUs between many users?",
};

#endif
