"""The response-flag vocabulary (agent/l7/flags.py): how a request's flags grow and how they are shown,
the same in the L4 and L7 paths' metrics, access lines and the response header."""

from __future__ import annotations

from hostmesh.agent.l7 import flags


def test_flags_keep_the_order_they_were_raised_and_count_once() -> None:
    f = flags.add("", flags.DI)
    f = flags.add(f, flags.URX)
    f = flags.add(f, flags.UF)
    f = flags.add(f, flags.UF)  # a flag raised again is not repeated
    assert f == "DI,URX,UF"


def test_a_peer_agents_flags_are_passed_on_as_they_came() -> None:
    assert flags.add("", "UH,URX") == "UH,URX"
    assert flags.add(flags.URX, "UF,URX") == "URX,UF"  # only what is new is appended
    assert flags.add(flags.URX, "") == flags.URX


def test_no_flag_renders_as_a_dash_and_flags_render_as_joined() -> None:
    assert flags.render("") == flags.NONE == "-"
    assert flags.render("URX,UF") == "URX,UF"


def test_every_flag_is_documented_once() -> None:
    assert len(set(flags.ALL)) == len(flags.ALL)
    assert set(flags.DESCRIPTIONS) == set(flags.ALL)
    assert flags.DC in flags.ALL  # the L4 path's "caller went away" flag is part of the one vocabulary


def test_a_peers_word_is_bounded_to_few_known_flags_each_once() -> None:
    """A peer agent's answer (a header, a RESET's reason) names label values: repeats, unknown
    flags and long lists of known ones would each have made a series of its own."""
    assert flags.known("AUTHZ,AUTHZ,UF") == flags.known("UF,AUTHZ") == "UF,AUTHZ"  # the vocabulary's order
    assert flags.known("X,UF,Y") == "UF"
    assert flags.known(",".join(flags.ALL)) == ",".join(flags.ALL[: flags.MAX_FROM_PEER])
    assert flags.refusal("AUTHZ") == "AUTHZ" and flags.refusal("UF") == "UF"
    for said in ("AUTHZ,AUTHZ", "AUTHZ,NI", "URX", "authz", "", "A" * 4000):
        assert flags.refusal(said) == ""  # one refusal flag, or no reason


def test_a_failure_is_a_5xx_or_a_flag_but_not_a_faults_delay_alone() -> None:
    """The L7 path's one rule for the access line written whatever the sample and the span exported
    and marked Error: a fault's delay alone (DI) only held the request back, its answer is the app's."""
    assert not flags.is_failure(200, "") and not flags.is_failure(404, "")
    assert not flags.is_failure(200, flags.DI)
    assert flags.is_failure(503, "") and flags.is_failure(503, flags.DI)  # delayed, then the app failed
    assert flags.is_failure(503, "DI,FI") and flags.is_failure(200, "DI,UT")  # delayed, then aborted or cut
    assert flags.is_failure(429, flags.RL) and flags.is_failure(200, flags.DC)
