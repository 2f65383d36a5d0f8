"""assess/received_chain.py: the client address of real Received headers, and the skip-listing walk.

The headers marked "corpus" are copied (unfolded) from the SpamAssassin messages in
../shared/corpus/ham-spam/ (tests/data/corpus/ has copies of some of them); the modern
ones (TLS comments, Exchange Online, Gmail, IPv6) follow the formats those servers write
today, with documentation addresses.
"""

from __future__ import annotations

import pytest

from poolmta.assess.received_chain import hop_ip, names_a_hop, original_client, received_headers

HOPS = [
    # corpus: Sendmail "from helo (rdns [ip])"
    ("from listman.spamassassin.taint.org (listman.spamassassin.taint.org [66.187.233.211]) by dogma.slashnull.org"
     " (8.11.6/8.11.6) with ESMTP id g7LCXvZ24654 for <jm-exmh@jmason.org>; Wed, 21 Aug 2002 13:33:57 +0100",
     "66.187.233.211"),
    # corpus: Sendmail without reverse DNS
    ("from ratree.psu.ac.th ([202.28.97.6]) by mx1.spamassassin.taint.org (8.11.6/8.11.6) with SMTP id g7LCGNl23207"
     " for <exmh-workers@redhat.com>; Wed, 21 Aug 2002 08:16:24 -0400", "202.28.97.6"),
    # corpus: Postfix, content filter re-injection on loopback
    ("from listman.spamassassin.taint.org (localhost.localdomain [127.0.0.1]) by listman.redhat.com (Postfix) with"
     " ESMTP id F12A13EA25; Wed, 21 Aug 2002 08:34:00 -0400 (EDT)", "127.0.0.1"),
    # corpus: Sendmail, HELO was an address literal: the real address is in the comment
    ("from [10.244.22.6] (MAXFACTOR-178.SPACEY.NET [206.208.61.178]) by gisn04.gisqatar.org.qa with SMTP (Microsoft"
     " Exchange Internet Mail Service Version 5.5.2653.13) id P6T47MR6; Wed, 1 Aug 2001 17:58:52 +0300",
     "206.208.61.178"),
    # corpus: Sendmail "(may be forged)" nested comment
    ("from [148.223.69.194] (customer-148-223-69-194.uninet.net.mx [148.223.69.194] (may be forged)) by"
     " mandark.labs.netnoteinc.com (8.11.2/8.11.2) with SMTP id g4HCt8D02396 for <jm@netnoteinc.com>; Fri, 17 May"
     " 2002 13:55:10 +0100", "148.223.69.194"),
    # corpus: Sendmail "user@[ip]"
    ("from sss.pgh.pa.us (root@[192.204.191.242]) by mx1.spamassassin.taint.org (8.11.6/8.11.6) with SMTP id"
     " g775Q0l29971 for <exmh-users@redhat.com>; Wed, 7 Aug 2002 01:26:00 -0400", "192.204.191.242"),
    # corpus: Exim "(rdns) ([ip] helo=name)"
    ("from h-66-134-120-173.lsanca54.covad.net ([66.134.120.173] helo=stealthgeeks.net) by"
     " usw-sf-list1.sourceforge.net with smtp (Exim 3.31-VA-mm2 #1 (Debian)) id 17XPXJ-0004st-00 for"
     " <razor-users@lists.sourceforge.net>; Wed, 24 Jul 2002 10:35:19 -0700", "66.134.120.173"),
    # corpus: Exim without reverse DNS: "from [ip] (helo=name)"
    ("from [194.165.167.234] (helo=excalibur.research.wombat.ie) by mail2.mail.iol.ie with esmtp (Exim 3.35 #1) id"
     " 17VsE4-0003TP-00; Sat, 20 Jul 2002 12:16:41 +0100", "194.165.167.234"),
    # corpus: qmail "from name (HELO helo) (ip)"
    ("from unknown (HELO sydint1.microthink.com.au) (49.34.201.119) by mail.gimmixx.net with asmtp; Sun, 28 Jul 0102"
     " 03:37:17 -0900", "49.34.201.119"),
    # corpus: qmail-ldap "(?token?@[ip])" with envelope-sender comment
    ("from localhost (HELO deepeddy.vircio.com) (?iwc0NnwWN+TAasDQHneXmsrngDKt2Eq7?@[127.0.0.1]) (envelope-sender"
     " <cwg-exmh@DeepEddy.Com>) by localhost (qmail-ldap-1.03) with SMTP for <exmh-workers@redhat.com>; 19 Jul 2002"
     " 21:16:31 -0000", "127.0.0.1"),
    ("from deepeddy.vircio.com (@[10.1.2.1]) (envelope-sender <cwg-exmh@DeepEddy.Com>) by austin-jump.vircio.com"
     " (qmail-ldap-1.03) with SMTP for <exmh-workers@redhat.com>; 19 Jul 2002 21:16:34 -0000", "10.1.2.1"),
    # corpus: the address as the "from" name, and a HELO comment; the "(ip)" after "by" is the receiver's
    ("from 65.189.7.13 (HELO alumni.rice.edu) by smtp.directvinternet.com (209.228.33.239) with SMTP; 21 Jul 2002"
     " 10:55:14 -0700", "65.189.7.13"),
    # corpus: Worldmail / Exchange 5.5 style "(ip)"
    ("from mvwbc.msn.com (64.14.243.42) by avhunts.avioninc.com (Worldmail 1.3.167); 3 Jul 2001 23:58:18 -0500",
     "64.14.243.42"),
    # corpus: SMTPD32: the name looks like an address, the bracketed one is the connection
    ("from 64.0.57.142 [202.63.165.34] by bettyjagessar.com (SMTPD32-7.06 EVAL) id A42A7FC01F2; Fri, 02 Aug 2002"
     " 02:18:18 -0400", "202.63.165.34"),
    # corpus: Microsoft SMTPSVC "ip - ip"
    ("from 200.181.124.54 - 200.181.124.54 by tsapp.tsapp with Microsoft SMTPSVC(5.5.1774.114.11); Tue, 30 Jul 2002"
     " 07:18:04 -0500", "200.181.124.54"),
    # corpus: smap "unknown(ip)"
    ("from unknown(10.0.0.13) by gw.educ.irlgov.ie via smap (V2.0) id xma013992; Tue, 13 Aug 02 11:28:06 +0100",
     "10.0.0.13"),
    # corpus: the bracketed address after "by" is the receiver's, not the client's
    ("from no.name.available by [213.190.149.122] via smtpd (for vms.eurokom.ie [192.135.225.92]) with SMTP; Mon, 22"
     " Jul 2002 08:16:37 +0000 (UT)", ""),
    # corpus: local submissions: no client address
    ("from twells by pulse.fsckit.net with local (Exim) id 17X7wo-0007df-00; Tue, 23 Jul 2002 18:16:02 -0400", ""),
    ("from localhost (localhost [[UNIX: localhost]]) by pen.homeip.net (8.11.6/8.11.6/SuSE Linux 0.5) id"
     " g6Q5jhG29143; Thu, 25 Jul 2002 21:45:43 -0800", ""),
    ("by crank.slack.net (Postfix, from userid 596) id 7AFAB3ED52; Wed, 24 Jul 2002 14:27:11 -0400 (EDT)", ""),
    ("(qmail 9445 invoked from network); 5 Aug 2002 09:16:12 -0000", ""),
    # modern Postfix: TLS comment before "by", IPv6 literal
    ("from mail.example.org (mail.example.org [IPv6:2001:db8:5::25]) (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"
     " (256/256 bits) key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256) (No client"
     " certificate requested) by mx.example.net (Postfix) with ESMTPS id 4T1x2y3z4Q for <u@example.net>; Mon,"
     " 4 Mar 2024 10:00:00 +0000 (UTC)", "2001:db8:5::25"),
    # modern Exim: IPv6 with port, HELO literal
    ("from host.example.org ([2001:db8::7]:51234 helo=[192.0.2.99]) by mx.example.net with esmtps"
     " (TLS1.3) tls TLS_AES_256_GCM_SHA384 (Exim 4.96) (envelope-from <a@example.org>) id 1rX-000A-00; Mon, 04 Mar"
     " 2024 10:00:00 +0000", "2001:db8::7"),
    # Exchange Online: bare IPv6 in the comment
    ("from DM6PR11MB1234.namprd11.prod.outlook.com (2603:10b6:5:1b0::15) by DM6PR11MB5678.namprd11.prod.outlook.com"
     " (2603:10b6:5:1b0::16) with Microsoft SMTP Server (version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)"
     " id 15.20.7362.19; Mon, 4 Mar 2024 10:00:00 +0000", "2603:10b6:5:1b0::15"),
    # Gmail
    ("from mail-sor-f41.google.com (mail-sor-f41.google.com. [209.85.220.41]) by mx.google.com with SMTPS id"
     " a1sor123.2024.03.04 for <u@example.net> (Google Transport Security); Mon, 04 Mar 2024 02:00:00 -0800 (PST)",
     "209.85.220.41"),
    ("by 2002:a05:6a10:1a4d:b0:4b3:3a1b:8d1e with SMTP id x13csp123456pxp; Mon, 4 Mar 2024 02:00:00 -0800 (PST)", ""),
    # IPv4-mapped IPv6 is its IPv4 address
    ("from a.example.org (a.example.org [IPv6:::ffff:192.0.2.44]) by mx.example.net (Postfix) with ESMTP id X", "192.0.2.44"),
]


@pytest.mark.parametrize("received, ip", HOPS)
def test_hop_ip(received, ip):
    assert hop_ip(received) == ip


def test_local_events_are_not_hops():
    assert not names_a_hop("by crank.slack.net (Postfix, from userid 596) id 7AFAB3ED52; Wed, 24 Jul 2002")
    assert not names_a_hop("(qmail 29637 invoked by uid 104); 19 Jul 2002 21:16:34 -0000")
    assert names_a_hop("from twells by pulse.fsckit.net with local (Exim) id 17X7wo-0007df-00; Tue, 23 Jul 2002")


# corpus: easy-ham-2__00001 (exmh-workers via Red Hat's list server), newest first, from the
# header that listman.redhat.com wrote downwards.
REDHAT_CHAIN = [
    "from listman.spamassassin.taint.org (localhost.localdomain [127.0.0.1]) by listman.redhat.com (Postfix) with"
    " ESMTP id F12A13EA25; Wed, 21 Aug 2002 08:34:00 -0400 (EDT)",
    "from int-mx1.corp.spamassassin.taint.org (int-mx1.corp.spamassassin.taint.org [172.16.52.254]) by"
    " listman.redhat.com (Postfix) with ESMTP id 750D33F945 for <exmh-workers@listman.redhat.com>; Wed, 21 Aug 2002"
    " 08:30:55 -0400 (EDT)",
    "(from mail@localhost) by int-mx1.corp.spamassassin.taint.org (8.11.6/8.11.6) id g7LCUqx17585 for"
    " exmh-workers@listman.redhat.com; Wed, 21 Aug 2002 08:30:52 -0400",
    "from mx1.spamassassin.taint.org (mx1.spamassassin.taint.org [172.16.48.31]) by int-mx1.corp.redhat.com"
    " (8.11.6/8.11.6) with SMTP id g7LCUqY17578 for <exmh-workers@redhat.com>; Wed, 21 Aug 2002 08:30:52 -0400",
    "from ratree.psu.ac.th ([202.28.97.6]) by mx1.spamassassin.taint.org (8.11.6/8.11.6) with SMTP id g7LCGNl23207"
    " for <exmh-workers@redhat.com>; Wed, 21 Aug 2002 08:16:24 -0400",
    "from delta.cs.mu.OZ.AU (delta.coe.psu.ac.th [172.30.0.98]) by ratree.psu.ac.th (8.11.6/8.11.6) with ESMTP id"
    " g7LCUIl27286; Wed, 21 Aug 2002 19:30:19 +0700 (ICT)",
]
LISTMAN = "66.187.233.211"


def test_no_skip_listing_is_the_connecting_client():
    r = original_client(LISTMAN, REDHAT_CHAIN)
    assert (r.ip, r.hop) == (LISTMAN, 0)


def test_skip_listed_connector_walks_to_the_first_hop_not_skipped():
    # The connector and the organisation's internal network are skipped; the loopback
    # re-injection and the local-submission line are passed over.
    r = original_client(LISTMAN, REDHAT_CHAIN, skip_ips=("66.187.233.211/32", "172.16.0.0/12"))
    assert (r.ip, r.hop) == ("202.28.97.6", 5)


def test_skip_last_hop_takes_the_hop_before_the_connector():
    chain = REDHAT_CHAIN[1:]
    r = original_client(LISTMAN, chain, skip_last_hop=True)
    assert (r.ip, r.hop) == ("172.16.52.254", 1)
    r = original_client(LISTMAN, chain, skip_ips=("172.16.0.0/12",), skip_last_hop=True)
    assert (r.ip, r.hop) == ("202.28.97.6", 4)


def test_a_skip_list_that_does_not_cover_the_connector_changes_nothing():
    r = original_client(LISTMAN, REDHAT_CHAIN, skip_ips=("172.16.0.0/12",))
    assert (r.ip, r.hop) == (LISTMAN, 0)


def test_a_hop_without_an_address_ends_the_walk_at_the_connecting_client():
    chain = ["from no.name.available by mail.co.kenosha.wi.us via smtpd (for gw.netnoteinc.com [193.120.149.226])"
             " with SMTP; 29 Jun 2001 23:19:06 UT",
             "from mail.example.org (mail.example.org [192.0.2.1]) by forged.example with ESMTP"]
    r = original_client("198.51.100.7", chain, skip_last_hop=True)
    assert (r.ip, r.hop) == ("198.51.100.7", 0)
    assert "names no client address" in r.detail


def test_everything_skipped_falls_back_to_the_connecting_client():
    r = original_client("198.51.100.7", REDHAT_CHAIN[:2], skip_ips=("172.16.0.0/12",), skip_last_hop=True)
    assert (r.ip, r.hop) == ("198.51.100.7", 0)
    assert "every hop" in r.detail


def test_forged_headers_below_the_first_unskipped_hop_are_never_read():
    chain = ["from evil.example (evil.example [203.0.113.66]) by relay.tenant.example (Postfix) with ESMTP id 1",
             "from spf-ok.example (spf-ok.example [192.0.2.10]) by evil.example with ESMTP id 2"]     # forged
    r = original_client("198.51.100.7", chain, skip_last_hop=True)
    assert r.ip == "203.0.113.66"


def test_ipv6_skip_networks_and_mapped_client():
    chain = ["from a.example.org (a.example.org [IPv6:2001:db8:1::5]) by relay.example.net (Postfix) with ESMTP id 1",
             "from b.example.org (b.example.org [192.0.2.9]) by a.example.org (Postfix) with ESMTP id 2"]
    r = original_client("::ffff:198.51.100.7", chain, skip_ips=("198.51.100.0/24", "2001:db8:1::/48"))
    assert (r.ip, r.hop) == ("192.0.2.9", 2)


def test_received_headers_unfolds_in_order():
    content = (b"Received: from a.example (a.example [192.0.2.1])\r\n\tby b.example with ESMTP id 1;\r\n"
               b" Mon, 4 Mar 2024 10:00:00 +0000\r\n"
               b"Subject: x\r\nReceived: by c.example (Postfix, from userid 5) id 2\r\n\r\nReceived: not a header\r\n")
    assert received_headers(content) == [
        "from a.example (a.example [192.0.2.1]) by b.example with ESMTP id 1; Mon, 4 Mar 2024 10:00:00 +0000",
        "by c.example (Postfix, from userid 5) id 2"]


def test_corpus_messages_parse_without_surprises():
    from pathlib import Path
    files = sorted((Path(__file__).resolve().parent.parent / "data" / "corpus").glob("*/*.eml"))
    assert files
    for f in files:
        for value in received_headers(f.read_bytes()):
            ip = hop_ip(value)
            assert ip == "" or ":" in ip or ip.count(".") == 3, (f.name, value, ip)
